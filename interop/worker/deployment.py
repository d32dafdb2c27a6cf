"""A Synapse deployment whose federation sender is an external instance, on one machine.

* `Services`: PostgreSQL + Redis from `scripts/services.sh` (the FEDSEND_TEST_* variables of the
  environment, or a private pair started here and stopped by `close`).
* `MainProcess`: Synapse's main process (`synapse.app.homeserver`) on PostgreSQL (a fresh copy of
  the services' Synapse-schema template) and Redis, with a TLS federation listener on the port of
  its server name, a plain client listener, a replication listener (`instance_map: {main: …}`),
  `federation_sender_instances` naming the external instances, and a worker replication secret.
  Built on `harness.Synapse` (registration, login, log scanning), with its config rewritten.
* `SenderInstance`: one federation sender instance, started by a pluggable command
  (`sender_command`): Synapse's own `generic_worker` (`python`) or `fedsend synapse` (`fedsend`).
* Remotes are plain `harness.Synapse` monoliths on SQLite.
* `RedisTap`: every message published on the main process's Redis channels, time-stamped, in a
  file (what the sender instance hears and says).
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
INTEROP = os.path.dirname(HERE)
ROOT = os.path.dirname(INTEROP)
if INTEROP not in sys.path:
    sys.path.insert(0, INTEROP)

import psycopg2  # noqa: E402  (the synapse venv has it: interop/requirements.txt)

from harness import HarnessError, Synapse, free_port, log, tail, wait_until  # noqa: E402

SENDER_START_TIMEOUT_S = 60
SENDER_STOP_TIMEOUT_S = 20
REPLICATION_SECRET = "worker-replication-secret"

# Outbound federation settings of hs1, read by every process of hs1 (so by the sender instance):
# a transaction to a server that is down fails after two quick retries instead of ~9 minutes,
# and the destination then backs off for `destination_min_retry_interval`.
FAST_FEDERATION_RETRIES = {
    "max_long_retries": 2,
    "max_long_retry_delay": "1s",
    "max_short_retries": 1,
    "max_short_retry_delay": "1s",
    "destination_min_retry_interval": "5s",
    "destination_max_retry_interval": "60s",
}


# The test's users act faster than Synapse's default client rate limits allow.
_MANY = {"per_second": 1000, "burst_count": 1000}
NO_RATE_LIMITS = {
    "rc_message": _MANY,
    "rc_registration": _MANY,
    "rc_login": {"address": _MANY, "account": _MANY, "failed_attempts": _MANY},
    "rc_joins": {"local": _MANY, "remote": _MANY},
    "rc_joins_per_room": _MANY,
    "rc_invites": {"per_room": _MANY, "per_user": _MANY, "per_issuer": _MANY},
    "rc_key_requests": _MANY,
    "rc_presence": {"per_user": _MANY},
    "rc_delayed_event_mgmt": _MANY,
    "rc_room_creation": _MANY,
    "rc_profile": _MANY,
}


def patch_config(synapse, changes):
    """Applies `changes` (top-level keys) to a harness-written Synapse config."""
    with open(synapse.config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(synapse.config_path, "w") as f:
        json.dump(config, f, indent=1)


def write_yaml(path, config):
    """Block-style YAML, as a deployment would write it (the harness writes JSON, also YAML)."""
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=False)


class RemoteSynapse(Synapse):
    """A remote homeserver: `harness.Synapse` (SQLite monolith) without client rate limits."""

    def _write_config(self):
        super()._write_config()
        patch_config(self, NO_RATE_LIMITS)


# ---------------------------------------------------------------------------------------------
# Redis (a few commands over RESP; the venv has no redis client that is not Twisted)
# ---------------------------------------------------------------------------------------------


def _resp_encode(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _resp_read(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise HarnessError(f"redis: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        return f.read(n + 2)[:-2].decode("utf8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise HarnessError(f"redis: unexpected reply {line!r}")


def redis_command(host, port, *args, timeout_s=5):
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(_resp_encode(*args))
        return _resp_read(s.makefile("rb"))


class RedisTap:
    """PSUBSCRIBE `<pattern>` in a thread; each message as `+SECONDS CHANNEL MESSAGE` in `path`."""

    def __init__(self, host, port, pattern, path, append=False):
        """`append`: a tap opened again after a Redis restart adds to the same file."""
        self.path = path
        self.t0 = time.monotonic()
        self.count = 0
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.sendall(_resp_encode("PSUBSCRIBE", pattern))
        self.file = self.sock.makefile("rb")
        _resp_read(self.file)  # the subscribe confirmation
        self.sock.settimeout(None)
        self.out = open(path, "a" if append else "w", encoding="utf8")
        self.thread = threading.Thread(target=self._run, name="redis-tap", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                msg = _resp_read(self.file)
                if isinstance(msg, list) and msg and msg[0] == "pmessage":
                    self.out.write(f"+{time.monotonic() - self.t0:8.3f} {msg[2]} {msg[3]}\n")
                    self.out.flush()
                    self.count += 1
        except (OSError, ValueError, ConnectionError, HarnessError):
            pass

    def lines(self):
        with open(self.path, encoding="utf8") as f:
            return f.read().splitlines()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        self.out.close()


# ---------------------------------------------------------------------------------------------
# PostgreSQL + Redis
# ---------------------------------------------------------------------------------------------


def parse_env_file(path):
    """The `export NAME=VALUE` lines of a services.sh env file."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                k, _, v = line[len("export "):].partition("=")
                env[k] = v
    return env


class Services:
    """PostgreSQL + Redis as described by FEDSEND_TEST_* (from `env`, else os.environ), or a
    private pair started with scripts/services.sh under `workdir` when there are none (or when
    `private` asks for one anyway).

    The fault checks stop and start them again (`kill_redis`/`start_redis`,
    `stop_postgres`/`start_postgres`), which needs the services directory of services.sh.
    `close` starts again whatever is still down, so a failed check leaves them running."""

    def __init__(self, workdir, env_file=None, private=False):
        self.own_dir = None
        env = parse_env_file(env_file) if env_file else dict(os.environ)
        self.redis_down = False  # by a fault check: `close` starts it again
        self.postgres_down = False
        if private or not env.get("FEDSEND_TEST_PG_PORT"):
            self.own_dir = os.path.join(workdir, "services")
            os.makedirs(self.own_dir, exist_ok=True)
            os.chmod(workdir, 0o755)
            os.chmod(self.own_dir, 0o755)
            log("no FEDSEND_TEST_* services given: starting a private PostgreSQL + Redis")
            subprocess.run([os.path.join(ROOT, "scripts", "services.sh"), "start", self.own_dir], check=True)
            env = parse_env_file(os.path.join(self.own_dir, "env"))
        self.dir = env.get("FEDSEND_TEST_SERVICES_DIR") or self.own_dir
        self.pg_host = env.get("FEDSEND_TEST_PG_HOST", "127.0.0.1")
        self.pg_port = int(env["FEDSEND_TEST_PG_PORT"])
        self.pg_user = env.get("FEDSEND_TEST_PG_USER", "postgres")
        self.template = env.get("FEDSEND_TEST_SYNAPSE_TEMPLATE") or None
        url = urllib.parse.urlsplit(env["FEDSEND_TEST_REDIS_URL"])
        self.redis_host = url.hostname or "127.0.0.1"
        self.redis_port = url.port or 6379
        self.databases = []

    def connect(self, dbname):
        conn = psycopg2.connect(host=self.pg_host, port=self.pg_port, user=self.pg_user, dbname=dbname)
        conn.autocommit = True
        return conn

    def create_database(self, name):
        """A fresh database for one homeserver (a copy of the Synapse-schema template if any)."""
        template = f"TEMPLATE {self.template}" if self.template else "TEMPLATE template0"
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name}")
                cur.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' {template}")
        finally:
            conn.close()
        self.databases.append(name)

    def redis(self, *args):
        return redis_command(self.redis_host, self.redis_port, *args)

    # -- faults -----------------------------------------------------------------------------

    def _need_dir(self):
        if not self.dir or not os.path.isdir(self.dir):
            raise HarnessError("no services directory (FEDSEND_TEST_SERVICES_DIR) to restart the services from")
        return self.dir

    def redis_pid(self):
        with open(os.path.join(self._need_dir(), "redis.pid")) as f:
            return int(f.read().strip())

    def kill_redis(self):
        """kill -9 of the Redis server; returns once it is gone."""
        pid = self.redis_pid()
        self.redis_down = True
        os.kill(pid, signal.SIGKILL)

        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(gone, 10, f"redis (pid {pid}) to die", interval_s=0.05)

    def start_redis(self):
        """Starts Redis again on the same port with the command line of `services.sh start`."""
        d = self._need_dir()
        subprocess.run(
            ["redis-server", "--bind", self.redis_host, "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--daemonize", "yes", "--pidfile", os.path.join(d, "redis.pid"),
             "--logfile", os.path.join(d, "redis.log"), "--dir", d],
            check=True, stdout=subprocess.DEVNULL, timeout=30,
        )

        def pong():
            try:
                return self.redis("PING") == "PONG"
            except (OSError, HarnessError):
                return False

        wait_until(pong, 20, "redis to answer PING again", interval_s=0.05)
        self.redis_down = False

    def _pg_ctl(self, *args):
        """pg_ctl (next to the running server's binary) as the cluster's owner."""
        data = os.path.join(self._need_dir(), "pg", "data")
        argv = self._postmaster_argv()
        command = [os.path.join(os.path.dirname(argv[0]), "pg_ctl"), "-D", data, *args]
        if os.getuid() == 0:  # services.sh makes the cluster the postgres user's when run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=60)

    def _postmaster_argv(self):
        # The server's own record of its command line (written at each start, kept after a stop).
        with open(os.path.join(self._need_dir(), "pg", "data", "postmaster.opts")) as f:
            return shlex.split(f.read())

    def stop_postgres(self):
        """`pg_ctl stop -m fast`: every connection is cut at once."""
        self.postgres_down = True
        self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop")

    def start_postgres(self):
        """Starts PostgreSQL again with the options it ran with (port, socket directory, …)."""
        argv = self._postmaster_argv()[1:]
        options, i = [], 0
        while i < len(argv):  # pg_ctl gives -D itself
            if argv[i] == "-D":
                i += 2
                continue
            options.append(argv[i])
            i += 1
        log_file = os.path.join(self._need_dir(), "pg", "postgres.log")
        self._pg_ctl("-l", log_file, "-w", "-t", "30", "-o", shlex.join(options), "start")
        self.postgres_down = False

    def close(self, drop=True):
        # Whatever a fault check left down runs again (the databases are dropped through it,
        # and services given to the run stay usable).
        for down, start in ((self.redis_down, self.start_redis), (self.postgres_down, self.start_postgres)):
            if down:
                try:
                    start()
                except (OSError, subprocess.SubprocessError, HarnessError) as e:
                    log(f"could not start a service again: {e}")
        if drop and self.databases:
            try:
                conn = self.connect("postgres")
                with conn.cursor() as cur:
                    for name in self.databases:
                        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                conn.close()
            except psycopg2.Error as e:
                log(f"could not drop the test databases: {e}")
        if self.own_dir:
            subprocess.run([os.path.join(ROOT, "scripts", "services.sh"), "stop", self.own_dir], check=False)


# ---------------------------------------------------------------------------------------------
# hs1: the main process
# ---------------------------------------------------------------------------------------------


class MainProcess(Synapse):
    """Synapse's main process on PostgreSQL + Redis that leaves federation sending to the
    instances named in `sender_instances`."""

    def __init__(self, workdir, services, dbname, sender_instances, python=None):
        self.services = services
        self.dbname = dbname
        self.sender_instances = list(sender_instances)
        self.replication_port = free_port()
        super().__init__(workdir, python=python)

    def _write_config(self):
        super()._write_config()  # keys, certificate, log config, the monolith's config
        with open(self.config_path) as f:
            config = json.load(f)
        s = self.services
        config["database"] = {
            "name": "psycopg2",
            "args": {
                "user": s.pg_user,
                "dbname": self.dbname,
                "host": s.pg_host,
                "port": s.pg_port,
                "cp_min": 1,
                "cp_max": 5,
            },
        }
        config["redis"] = {"enabled": True, "host": s.redis_host, "port": s.redis_port}
        config["listeners"].append(
            {
                "port": self.replication_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            }
        )
        config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
        config["federation_sender_instances"] = self.sender_instances
        config["worker_replication_secret"] = REPLICATION_SECRET
        config["federation"] = dict(FAST_FEDERATION_RETRIES)
        config.update(NO_RATE_LIMITS)
        write_yaml(self.config_path, config)

    def query(self, sql, args=()):
        conn = self.services.connect(self.dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def subscribers(self):
        """Connections subscribed to the main process's replication channel (main + instances)."""
        reply = self.services.redis("PUBSUB", "NUMSUB", self.server_name)
        return int(reply[1])


# ---------------------------------------------------------------------------------------------
# The sender instances
# ---------------------------------------------------------------------------------------------


def sender_command(kind, *, python, fedsend_bin, main_config, worker_config, instance, listen_port):
    """The command line that starts federation sender instance `instance` of hs1.

    python:  Synapse's own generic worker, configured by hs1's config plus the worker's file.
    fedsend: `fedsend synapse`, given the same two config files, its instance name and where to
             listen (health/metrics)."""
    if kind == "python":
        return [python, "-m", "synapse.app.generic_worker", "-c", main_config, "-c", worker_config]
    if kind == "fedsend":
        return [
            fedsend_bin,
            "synapse",
            "--config",
            main_config,
            "--config",
            worker_config,
            "--instance",
            instance,
            "--listen",
            f"127.0.0.1:{listen_port}",
        ]
    raise ValueError(f"unknown sender kind {kind!r}")


class SenderInstance:
    """One federation sender instance of hs1 (`worker_name`), started and stopped by pid."""

    def __init__(self, main, name, kind, fedsend_bin=None):
        self.main = main
        self.name = name
        self.kind = kind
        self.fedsend_bin = fedsend_bin
        self.workdir = main.workdir
        self.listen_port = free_port()
        self.config_path = os.path.join(self.workdir, f"{name}.yaml")
        # Per kind, so that a switch from Synapse's worker to fedsend keeps the two apart.
        self.log_path = os.path.join(self.workdir, f"{name}.{kind}.log")  # Synapse worker's log
        self.stdout_path = os.path.join(self.workdir, f"{name}.{kind}.stdout.log")
        self.proc = None
        self.starts = 0
        with open(os.path.join(self.workdir, "log.yaml")) as f:
            log_config = json.load(f)
        log_config["handlers"]["file"]["filename"] = self.log_path
        log_config_path = os.path.join(self.workdir, f"{name}.{kind}.log.yaml")
        with open(log_config_path, "w") as f:
            json.dump(log_config, f, indent=1)
        worker = {
            "worker_app": "synapse.app.generic_worker",
            "worker_name": name,
            "worker_log_config": log_config_path,
            # Synapse's worker: Prometheus metrics on the port fedsend would get for --listen.
            "worker_listeners": [
                {"type": "metrics", "port": self.listen_port, "bind_addresses": ["127.0.0.1"]}
            ],
            "enable_metrics": True,
        }
        write_yaml(self.config_path, worker)

    def command(self):
        return sender_command(
            self.kind,
            python=self.main.python,
            fedsend_bin=self.fedsend_bin,
            main_config=self.main.config_path,
            worker_config=self.config_path,
            instance=self.name,
            listen_port=self.listen_port,
        )

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Starts the instance; ready once it has subscribed to hs1's replication channel."""
        if self.running():
            raise HarnessError(f"{self.name} is already running")
        before = self.main.subscribers()
        t0 = time.monotonic()
        out = open(self.stdout_path, "ab")
        out.write(f"---- start {self.starts + 1}: {' '.join(self.command())}\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        out.close()
        self.starts += 1

        def subscribed():
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"{self.name} exited with {self.proc.returncode} while starting; "
                    f"last lines of {self.stdout_path}:\n{tail(self.stdout_path)}"
                )
            return self.main.subscribers() > before

        wait_until(subscribed, SENDER_START_TIMEOUT_S, f"{self.name} to subscribe to hs1's Redis channel")
        log(f"sender instance {self.name} ({self.kind}) subscribed in {time.monotonic() - t0:.1f} s (pid {self.proc.pid})")

    def stop(self, sig=signal.SIGTERM):
        """Stops the process (SIGKILL after a timeout) and waits until Redis has dropped its
        subscription, so that the next `start` can tell the new one apart."""
        if not self.running():
            return
        try:
            before = self.main.subscribers()
        except OSError:
            before = None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(SENDER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if before:
            try:
                wait_until(lambda: self.main.subscribers() < before, 5, f"Redis to drop {self.name}", interval_s=0.05)
            except (HarnessError, OSError):
                pass  # not subscribed (yet) when stopped

    def pause(self):
        """SIGSTOP: the process is frozen (what it receives meanwhile waits in its sockets)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def health(self):
        """fedsend's `GET /health` on its --listen port: (status code, JSON body)."""
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{self.listen_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_size(self):
        """A mark in the instance's stdout/stderr log, for `log_since`."""
        return os.path.getsize(self.stdout_path)

    def log_since(self, offset):
        with open(self.stdout_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf8", "replace")

    def pdus_sent_to(self, destination):
        """PDUs this (fedsend) instance delivered to `destination`, from its log lines."""
        import re

        with open(self.stdout_path, encoding="utf8", errors="replace") as f:
            text = f.read()
        pattern = re.compile(r"sent transaction destination=(\S+) txn_id=\S+ pdus=(\d+)")
        return sum(int(m.group(2)) for m in pattern.finditer(text) if m.group(1) == destination)

    def sent_to(self, destination):
        """Whether this instance's logs show a transaction sent to `destination`.

        python: Synapse logs each outbound request as `{PUT-O-n} [destination] ...`;
        fedsend: its `sent transaction destination=NAME` log line."""
        if self.kind == "python":
            with open(self.log_path, encoding="utf8", errors="replace") as f:
                text = f.read()
            return any(
                f"[{destination}] Completed request: 200" in line and "/_matrix/federation/v1/send/" in line
                for line in text.splitlines()
            )
        with open(self.stdout_path, encoding="utf8", errors="replace") as f:
            text = f.read()
        # The driver logs `sent transaction destination=NAME txn_id=…` per delivered transaction.
        return any("sent transaction" in line and f"destination={destination} " in line for line in text.splitlines())


def shard_owner(destination, instances):
    """Synapse's sharding: sha256 of the destination read as a little-endian integer, mod N."""
    import hashlib

    if len(instances) == 1:
        return instances[0]
    digest = hashlib.sha256(destination.encode("utf8")).digest()
    return instances[int.from_bytes(digest, "little") % len(instances)]
