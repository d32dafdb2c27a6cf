"""A real Synapse as the federation peer of the origin server, on loopback.

Two halves:

* `Synapse`: a homeserver from PyPI started from a generated config (recipe and the reasons for
  each setting: shared reference synapse-peer.md), with helpers to register users, read a user's
  `/sync`, query its SQLite database and metrics, and scan its log for refused transactions.
* `Origin`: the server on our side, `127.0.0.1:PORT`. It owns an ed25519 signing key (also written
  as a Synapse-format key file that `fedsend serve` can load), serves its key over HTTPS for
  Synapse to fetch, joins Synapse rooms through make_join/send_join, builds, hashes and signs its
  events with Synapse's own helpers, and can itself PUT signed `/send` transactions (the
  "harness" sending mode that validates the peer without fedsend).

Runs inside the Synapse virtualenv (`tools/python/synapse-venv`, made by scripts/setup.sh), which
has every library used here.
"""

import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

import requests
from canonicaljson import encode_canonical_json
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)
from signedjson.sign import sign_json

# Synapse's start-up from a fresh SQLite database takes 3-4 s on a loaded 2-core machine; a minute
# leaves room for CI running other compilers next to us.
SYNAPSE_START_TIMEOUT_S = 60
SYNAPSE_STOP_TIMEOUT_S = 20


class HarnessError(Exception):
    """The peer could not be set up or did not answer as Synapse does."""


def now_ms():
    return int(time.time() * 1000)


def log(msg):
    print(f"interop: {msg}", flush=True)


def free_port():
    """A loopback TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s, what, interval_s=0.1):
    """Polls `predicate` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def write_self_signed_cert(cert_path, key_path):
    """A throwaway certificate for 127.0.0.1 (peers run with certificate checks off)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


# ---------------------------------------------------------------------------------------------
# Synapse
# ---------------------------------------------------------------------------------------------

# An access-log line: `... {origin} Processed request: 0.004sec/0.000sec ru=(...) db=(...) 11B 200 "PUT
# /path HTTP/1.1" ...` (the status gets a `!` when the client went away before the answer).
ACCESS_LINE = re.compile(r'Processed request: .*? \d+B (\d{3})!? "(\S+) (\S+) ')
# Lines that mean a sender broke one of the rules of issue 6, check 4.
COUNT_TOO_LARGE = "Transaction PDU or EDU count too large"
CONCURRENT_TXN = "Received another txn"


class Synapse:
    """One Synapse homeserver on loopback: federation over TLS on the port of its server name,
    client API (and federation) over plain HTTP on a second port, Prometheus on a third."""

    def __init__(self, workdir, python=None):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.python = python or sys.executable
        self.federation_port = free_port()
        self.client_port = free_port()
        self.metrics_port = free_port()
        self.server_name = f"127.0.0.1:{self.federation_port}"
        self.shared_secret = "interop-registration-secret"
        self.db_path = os.path.join(self.workdir, "homeserver.db")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.stdout_path = os.path.join(self.workdir, "stdout.log")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.proc = None
        self._write_config()

    @property
    def client_url(self):
        return f"http://127.0.0.1:{self.client_port}"

    def _write_config(self):
        w = self.workdir
        with open(os.path.join(w, "signing.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_syn")])
        write_self_signed_cert(os.path.join(w, "tls.crt"), os.path.join(w, "tls.key"))
        # A plain FileHandler: the generated log config buffers INFO lines for seconds, and the
        # test greps the log right after the requests it checks.
        log_config = {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": self.log_path,
                    "filters": ["context"],
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        with open(os.path.join(w, "log.yaml"), "w") as f:
            json.dump(log_config, f, indent=1)  # JSON is YAML
        config = {
            "server_name": self.server_name,
            "pid_file": os.path.join(w, "homeserver.pid"),
            "listeners": [
                # Federation over TLS on the port of the server name: what a sender that resolves
                # `127.0.0.1:PORT` by the spec contacts.
                {
                    "port": self.federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "resources": [{"names": ["federation"]}],
                },
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "resources": [{"names": ["client", "federation"]}],
                },
                {"port": self.metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"},
            ],
            "enable_metrics": True,
            "tls_certificate_path": os.path.join(w, "tls.crt"),
            "tls_private_key_path": os.path.join(w, "tls.key"),
            "database": {"name": "sqlite3", "args": {"database": self.db_path}},
            "log_config": os.path.join(w, "log.yaml"),
            "media_store_path": os.path.join(w, "media"),
            "signing_key_path": os.path.join(w, "signing.key"),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": "interop-macaroon",
            "form_secret": "interop-form",
            "report_stats": False,
            # The origin's certificate is self-signed.
            "federation_verify_certificates": False,
            # IP-literal server names are checked against the blacklist only (the whitelist is
            # not consulted on that path), so loopback must be out of it.
            "ip_range_blacklist": [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
                "fe80::/10",
                "fc00::/7",
            ],
            "ip_range_whitelist": ["127.0.0.1"],
            # Fetch the origin's key from the origin, not from matrix.org.
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            # Otherwise an identical /sync within 2 minutes is answered from a cache.
            "caches": {"sync_response_cache_duration": 0},
            "presence": {"enabled": True},
        }
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("Synapse is already running")
        t0 = time.monotonic()
        out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "synapse.app.homeserver", "-c", self.config_path],
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()

        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"Synapse exited with {self.proc.returncode} while starting; "
                    f"last lines of {self.stdout_path}:\n{tail(self.stdout_path)}"
                )
            try:
                return requests.get(self.client_url + "/health", timeout=2).text == "OK"
            except requests.RequestException:
                return False

        wait_until(ready, SYNAPSE_START_TIMEOUT_S, "Synapse's /health", interval_s=0.1)
        log(f"Synapse {self.server_name} up in {time.monotonic() - t0:.1f} s (pid {self.proc.pid})")

    def stop(self):
        """SIGTERM and wait; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(SYNAPSE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- users ---------------------------------------------------------------------------------

    def register(self, localpart, password, admin=False):
        """Shared-secret registration (what `register_new_matrix_user` does, without its start-up)."""
        url = self.client_url + "/_synapse/admin/v1/register"
        nonce = requests.get(url, timeout=10).json()["nonce"]
        role = "admin" if admin else "notadmin"
        # HMAC-SHA1 over the four parts joined by NULs (no trailing one), keyed by the secret.
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(p.encode() for p in (nonce, localpart, password, role)))
        body = {"nonce": nonce, "username": localpart, "password": password, "admin": admin, "mac": mac.hexdigest()}
        r = requests.post(url, json=body, timeout=30)
        if r.status_code != 200:
            raise HarnessError(f"registering {localpart}: {r.status_code} {r.text}")
        return r.json()["user_id"]

    def login(self, localpart, password, device_id):
        r = requests.post(
            self.client_url + "/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
                "device_id": device_id,
            },
            timeout=30,
        )
        if r.status_code != 200:
            raise HarnessError(f"logging in {localpart}: {r.status_code} {r.text}")
        j = r.json()
        return Client(self, j["access_token"], j["user_id"], j["device_id"])

    # -- observation -------------------------------------------------------------------------

    def query(self, sql, args=()):
        """Read-only query of Synapse's SQLite database (safe while Synapse runs)."""
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def metrics(self):
        """Prometheus samples: {'name{labels}': value} (counters reset when Synapse restarts)."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                samples[key] = float(value)
            except ValueError:
                pass
        return samples

    def metric_sum(self, name):
        """Sum of one metric over all its label sets (0 when it has none yet)."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def log_lines(self, start_offset=0):
        with open(self.log_path, "rb") as f:
            f.seek(start_offset)
            return f.read().decode("utf8", "replace").splitlines()

    def log_problems(self, start_offset=0):
        """Lines of the log (from a byte offset) showing what check 4 of issue 6 forbids: a 401
        answer to anything, a transaction refused as too large (400), or a second concurrent
        transaction from one origin (429)."""
        problems = []
        for line in self.log_lines(start_offset):
            m = ACCESS_LINE.search(line)
            if m and m.group(1) == "401":
                problems.append(line)
            elif m and m.group(1) == "429" and "/federation/" in m.group(3):
                problems.append(line)
            elif COUNT_TOO_LARGE in line or CONCURRENT_TXN in line:
                problems.append(line)
        return problems

    def access_lines(self, start_offset=0, path_prefix="/_matrix/federation/v1/send/"):
        """(status, method, path) of each request Synapse answered under `path_prefix`."""
        out = []
        for line in self.log_lines(start_offset):
            m = ACCESS_LINE.search(line)
            if m and m.group(3).startswith(path_prefix):
                out.append((int(m.group(1)), m.group(2), m.group(3)))
        return out


def tail(path, lines=30):
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode("utf8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no file)"


class SyncLog:
    """Everything one user's /sync has returned so far, across calls."""

    def __init__(self):
        self.to_device = []
        self.timeline = {}  # room -> [event]
        self.ephemeral = {}  # room -> [event]
        self.presence = []

    def add(self, body):
        self.to_device.extend(body.get("to_device", {}).get("events", []))
        self.presence.extend(body.get("presence", {}).get("events", []))
        for room_id, room in body.get("rooms", {}).get("join", {}).items():
            timeline = room.get("timeline", {})
            if timeline.get("limited") and self.timeline.get(room_id):
                # A gap in what we saw would make "in order, exactly once" unprovable.
                raise HarnessError(f"/sync timeline of {room_id} was limited (events skipped)")
            self.timeline.setdefault(room_id, []).extend(timeline.get("events", []))
            self.ephemeral.setdefault(room_id, []).extend(room.get("ephemeral", {}).get("events", []))


# Every timeline event since the last sync, not the default last 10.
SYNC_FILTER = json.dumps({"room": {"timeline": {"limit": 1000}}}, separators=(",", ":"))


class Client:
    """A Synapse user through the client API (the most black-box view)."""

    def __init__(self, synapse, access_token, user_id, device_id):
        self.synapse = synapse
        self.user_id = user_id
        self.device_id = device_id
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {access_token}"
        self.since = None
        self.seen = SyncLog()

    def _url(self, path):
        return self.synapse.client_url + path

    def create_room(self, name, room_version=None):
        body = {"preset": "public_chat", "name": name}
        if room_version:
            body["room_version"] = room_version
        r = self.session.post(self._url("/_matrix/client/v3/createRoom"), json=body, timeout=30)
        if r.status_code != 200:
            raise HarnessError(f"createRoom: {r.status_code} {r.text}")
        return r.json()["room_id"]

    def sync_once(self, timeout_ms=0):
        """One /sync, chained on the previous one's `next_batch`, so each result is new (this
        also acknowledges to-device messages, which Synapse hands out at most 100 at a time)."""
        params = {"timeout": str(timeout_ms), "filter": SYNC_FILTER}
        if self.since:
            params["since"] = self.since
        r = self.session.get(self._url("/_matrix/client/v3/sync"), params=params, timeout=timeout_ms / 1000 + 30)
        if r.status_code != 200:
            raise HarnessError(f"/sync: {r.status_code} {r.text}")
        body = r.json()
        self.since = body["next_batch"]
        self.seen.add(body)
        return body

    def sync_until(self, predicate, timeout_s, what):
        """Syncs until `predicate(self.seen)` holds."""

        def step():
            self.sync_once(timeout_ms=500)
            return predicate(self.seen)

        return wait_until(step, timeout_s, what, interval_s=0)

    def sync_drain(self, quiet_s=1.5):
        """Syncs until nothing new arrives for `quiet_s` (to catch late duplicates)."""
        deadline = time.monotonic() + quiet_s
        while time.monotonic() < deadline:
            body = self.sync_once(timeout_ms=300)
            if body.get("to_device", {}).get("events") or body.get("rooms", {}).get("join"):
                deadline = time.monotonic() + quiet_s


# ---------------------------------------------------------------------------------------------
# The origin (our side)
# ---------------------------------------------------------------------------------------------


class Room:
    """What the origin knows about a room it joined: enough to chain and authorise its events."""

    def __init__(self, room_id, version, power_levels_id, create_id, depth):
        self.room_id = room_id
        self.version = version  # synapse RoomVersion
        self.power_levels_id = power_levels_id
        self.create_id = create_id
        self.create_event = None  # the PDU, for a sender that must know the room from its start
        self.members = {}  # our user -> its join event id
        self.latest = []  # forward extremities as the origin sees them
        self.depth = depth


class Origin:
    """The homeserver on our side: `127.0.0.1:PORT`, an ed25519 key, its events and rooms."""

    def __init__(self, workdir, port=None, key_version="a_fed"):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = port or free_port()
        self.server_name = f"127.0.0.1:{self.port}"
        self.signing_key = generate_signing_key(key_version)
        self.key_id = f"ed25519:{key_version}"
        # Synapse's signing-key file format (`ed25519 VERSION SEED`), for fedsend to load.
        self.signing_key_path = os.path.join(self.workdir, "origin.signing.key")
        with open(self.signing_key_path, "w") as f:
            write_signing_keys(f, [self.signing_key])
        self.cert_path = os.path.join(self.workdir, "origin.tls.crt")
        self.cert_key_path = os.path.join(self.workdir, "origin.tls.key")
        write_self_signed_cert(self.cert_path, self.cert_key_path)
        self.events = {}  # event id -> PDU, served back to Synapse on request
        self.rooms = {}
        self.inbound = []  # (method, path) Synapse sent to us, for diagnosis
        self.inbound_lock = threading.Lock()
        self.events_served = 0  # events Synapse fetched back from us (gaps it had to fill)
        self._server = None
        self._conns = {}
        self._txn_counter = 0
        self.run_id = f"{now_ms():x}"  # keeps txn ids unique across runs against one database

    def user(self, localpart):
        return f"@{localpart}:{self.server_name}"

    # -- the key server and the other endpoints Synapse calls on us ------------------------

    def key_document(self):
        """Body of `GET /_matrix/key/v2/server`, signed with the origin's key."""
        return sign_json(
            {
                "server_name": self.server_name,
                "valid_until_ts": now_ms() + 86_400_000,
                "verify_keys": {
                    self.key_id: {"key": encode_verify_key_base64(get_verify_key(self.signing_key))}
                },
                "old_verify_keys": {},
            },
            self.server_name,
            self.signing_key,
        )

    def serve(self):
        """HTTPS on the origin's port: the key, its events (so Synapse can fill gaps through
        /event and get_missing_events), and polite answers to what Synapse sends us."""
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = encode_canonical_json(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _route(self, method):
                path = urllib.parse.urlsplit(self.path).path
                body = self._body() if method in ("PUT", "POST") else None
                with origin.inbound_lock:
                    origin.inbound.append((method, path))
                status, reply = origin.answer(method, path, body)
                self._reply(status, reply)

            def do_GET(self):
                self._route("GET")

            def do_PUT(self):
                self._route("PUT")

            def do_POST(self):
                self._route("POST")

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.cert_key_path)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="origin-https", daemon=True).start()

    def stop_serving(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, method, path, body):
        fed = "/_matrix/federation/v1/"
        unquote = urllib.parse.unquote
        if method == "GET" and path == "/_matrix/key/v2/server":
            return 200, self.key_document()
        if method == "GET" and path.startswith(fed + "event/"):
            ev = self.events.get(unquote(path[len(fed + "event/"):]))
            if ev is None:
                return 404, {"errcode": "M_NOT_FOUND", "error": "unknown event"}
            with self.inbound_lock:
                self.events_served += 1
            return 200, {"origin": self.server_name, "origin_server_ts": now_ms(), "pdus": [ev]}
        if method == "POST" and path.startswith(fed + "get_missing_events/"):
            events = self.missing_events(body or {})
            with self.inbound_lock:
                self.events_served += len(events)
            return 200, {"events": events}
        if method == "PUT" and path.startswith(fed + "send/"):
            return 200, {"pdus": {}}
        if method == "GET" and path.startswith(fed + "user/devices/"):
            return 200, {"user_id": unquote(path[len(fed + "user/devices/"):]), "stream_id": 0, "devices": []}
        if method == "POST" and path == fed + "user/keys/query":
            return 200, {"device_keys": {}}
        if method == "GET" and path.startswith(fed + "query/profile"):
            return 200, {}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "not served by the interop origin"}

    def missing_events(self, body):
        """Our events between `earliest_events` (exclusive) and `latest_events` (exclusive),
        oldest first, at most `limit`: the walk back Synapse asks for when it lacks prev_events."""
        earliest = set(body.get("earliest_events", []))
        limit = int(body.get("limit", 10))
        found, queue, seen = [], list(body.get("latest_events", [])), set()
        while queue and len(found) < limit:
            ev_id = queue.pop(0)
            for prev in self.events.get(ev_id, {}).get("prev_events", []):
                if prev in seen or prev in earliest or prev not in self.events:
                    continue
                seen.add(prev)
                found.append(self.events[prev])
                queue.append(prev)
        found.sort(key=lambda e: e["depth"])
        return found[:limit]

    # -- requests to Synapse --------------------------------------------------------------

    def x_matrix(self, method, uri, destination, content=None):
        request = {"method": method, "uri": uri, "origin": self.server_name, "destination": destination}
        if content is not None:
            request["content"] = content
        sig = sign_json(request, self.server_name, self.signing_key)["signatures"][self.server_name][self.key_id]
        return (
            f'X-Matrix origin="{self.server_name}",destination="{destination}",'
            f'key="{self.key_id}",sig="{sig}"'
        )

    def request(self, synapse, method, uri, content=None, sign=True):
        """One federation request to Synapse's TLS port, on a kept-alive connection.
        Returns (status, parsed body)."""
        headers = {"Content-Type": "application/json"}
        if sign:
            headers["Authorization"] = self.x_matrix(method, uri, synapse.server_name, content)
        data = encode_canonical_json(content) if content is not None else None
        for attempt in (0, 1):
            conn = self._conns.get(synapse.server_name)
            if conn is None:
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", synapse.federation_port, timeout=60, context=ssl._create_unverified_context()
                )
                self._conns[synapse.server_name] = conn
            try:
                conn.request(method, uri, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                # A kept-alive connection the server closed (e.g. after a restart): one fresh try.
                conn.close()
                self._conns.pop(synapse.server_name, None)
                if attempt:
                    raise
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf8", "replace")
        return resp.status, parsed

    def next_txn_id(self):
        self._txn_counter += 1
        return f"h{self.run_id}-{self._txn_counter}"

    def send_transaction(self, synapse, pdus=(), edus=(), txn_id=None):
        """PUT /send/{txnId} with the given PDUs and EDUs. Returns (txn id, status, body)."""
        txn_id = txn_id or self.next_txn_id()
        body = {"origin": self.server_name, "origin_server_ts": now_ms(), "pdus": list(pdus)}
        if edus:
            body["edus"] = list(edus)
        status, reply = self.request(synapse, "PUT", f"/_matrix/federation/v1/send/{txn_id}", body)
        return txn_id, status, reply

    # -- rooms and events -------------------------------------------------------------------

    def join(self, synapse, room_id, localpart):
        """make_join / send_join for `@localpart:origin` into a Synapse room."""
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
        from synapse.crypto.event_signing import add_hashes_and_signatures
        from synapse.events import make_event_from_dict

        user_id = self.user(localpart)
        q = urllib.parse.quote
        versions = "&".join(f"ver={v}" for v in KNOWN_ROOM_VERSIONS)
        status, reply = self.request(
            synapse, "GET", f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?{versions}"
        )
        if status != 200:
            raise HarnessError(f"make_join {room_id} for {user_id}: {status} {reply}")
        version = KNOWN_ROOM_VERSIONS[reply["room_version"]]
        ev = dict(reply["event"])
        ev["origin_server_ts"] = now_ms()
        add_hashes_and_signatures(version, ev, self.server_name, self.signing_key)
        event_id = make_event_from_dict(ev, version).event_id
        status, reply = self.request(
            synapse, "PUT", f"/_matrix/federation/v2/send_join/{q(room_id)}/{q(event_id)}", ev
        )
        if status != 200:
            raise HarnessError(f"send_join {room_id} for {user_id}: {status} {reply}")
        power_levels = [
            s for s in reply["state"] if s.get("type") == "m.room.power_levels" and s.get("state_key") == ""
        ]
        if not power_levels:
            raise HarnessError(f"send_join {room_id}: no power levels in the returned state")
        pl_id = make_event_from_dict(power_levels[0], version).event_id
        creates = [s for s in reply["state"] if s.get("type") == "m.room.create"]
        create_id = make_event_from_dict(creates[0], version).event_id if creates else None
        room = self.rooms.get(room_id) or Room(room_id, version, pl_id, create_id, ev["depth"])
        room.create_event = creates[0] if creates else None
        room.members[user_id] = event_id
        room.latest = [event_id]
        room.depth = max(room.depth, ev["depth"])
        self.rooms[room_id] = room
        self.events[event_id] = ev
        return event_id

    def make_event(self, room_id, sender_localpart, event_type, content, state_key=None):
        """A new event of ours on top of the room's latest, hashed and signed: (event id, PDU).
        The caller decides how it travels (directly, or through fedsend)."""
        from synapse.crypto.event_signing import add_hashes_and_signatures
        from synapse.events import make_event_from_dict

        room = self.rooms[room_id]
        sender = self.user(sender_localpart)
        ev = {
            "type": event_type,
            "room_id": room_id,
            "sender": sender,
            "content": content,
            "depth": room.depth + 1,
            "prev_events": list(room.latest),
            "auth_events": [room.power_levels_id, room.members[sender]],
            "origin_server_ts": now_ms(),
        }
        # From room version 12 on the create event is implied (the room id is its hash).
        if not room.version.msc4291_room_ids_as_hashes:
            ev["auth_events"].insert(0, room.create_id)
        if state_key is not None:
            ev["state_key"] = state_key
        add_hashes_and_signatures(room.version, ev, self.server_name, self.signing_key)
        event_id = make_event_from_dict(ev, room.version).event_id
        room.latest = [event_id]
        room.depth += 1
        self.events[event_id] = ev
        return event_id, ev

    # -- EDUs (shapes as Synapse sends and accepts them) -----------------------------------

    def to_device_edu(self, sender_localpart, messages, message_id, event_type="m.interop.test"):
        return {
            "edu_type": "m.direct_to_device",
            "content": {
                "sender": self.user(sender_localpart),
                "type": event_type,
                "message_id": message_id,
                "messages": messages,
            },
        }

    def typing_edu(self, room_id, localpart, typing=True):
        return {"edu_type": "m.typing", "content": {"room_id": room_id, "user_id": self.user(localpart), "typing": typing}}

    def receipt_edu(self, room_id, localpart, event_id):
        return {
            "edu_type": "m.receipt",
            "content": {
                room_id: {
                    "m.read": {self.user(localpart): {"event_ids": [event_id], "data": {"ts": now_ms()}}}
                }
            },
        }

    def presence_edu(self, localpart, presence="online", status_msg=None):
        state = {
            "user_id": self.user(localpart),
            "presence": presence,
            "last_active_ago": 1000,
            "currently_active": presence == "online",
        }
        if status_msg:
            state["status_msg"] = status_msg
        return {"edu_type": "m.presence", "content": {"push": [state]}}
