"""End-to-end test of a Synapse deployment whose federation sender is an external instance.

    tools/python/synapse-venv/bin/python interop/worker/test_worker.py --sender python
    tools/python/synapse-venv/bin/python interop/worker/test_worker.py --sender fedsend --fedsend target/release/fedsend

hs1 is Synapse's main process on PostgreSQL + Redis with `federation_sender_instances` naming the
sender instances (default `fedsend1`); hs2 (and any further remotes) are Synapse monoliths on
SQLite. The sender instances are Synapse's own generic worker (`--sender python`) or
`fedsend synapse` (`--sender fedsend`). Everything happens through the client APIs of hs1 and hs2
(and hs1's database for the sender's bookkeeping). Prints `ok - …` / `not ok - …` per check and a
closing `N passed, N failed` line; exits 1 on any failure.

PostgreSQL + Redis: the FEDSEND_TEST_* variables of `scripts/services.sh` (environment or
`--services-env FILE`), else (or with --private-services) a private pair started and stopped here.
The fault checks (--pg-outage, --redis-restart, --bad-replication) stop and start these services;
README.md lists every check.
"""

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import urllib.parse

from deployment import (
    ROOT,
    MainProcess,
    RedisTap,
    RemoteSynapse,
    SenderInstance,
    Services,
    shard_owner,
)
from harness import ACCESS_LINE, Client, HarnessError, SyncLog, log, now_ms, wait_until

DELIVERY_TIMEOUT_S = 30  # one PDU or EDU from alice on hs1 to bob on hs2
NEGATIVE_WAIT_S = 5  # how long a message must stay undelivered while no sender runs
BACKLOG_WAIT_PYTHON_S = 10  # Synapse's worker: how long to watch for the backlog before nudging it
BACKLOG_WAIT_FEDSEND_S = 30
OUTAGE_TIMEOUT_S = 60
SERVICE_DOWN_S = 5  # how long Redis or PostgreSQL stays down in the fault checks
# fedsend's /health stays degraded for a minute after the last problem it saw
# (HEALTH_PROBLEM_WINDOW_MS in service/src/serve/metrics.rs); a little more is allowed.
HEALTH_RECOVERY_S = 60 + 30
# How often an instance retries a replication read that failed (RETRY_INTERVAL in
# service/src/synapse_worker/feed.rs).
FEED_RETRY_S = 5
LOG_LINE_MAX = 4096  # longest log line an instance may write about a malformed replication line


class CheckFailed(Exception):
    pass


class Checks:
    """`ok - …` / `not ok - …` per check, and the closing count."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def ok(self, what):
        self.passed += 1
        print(f"ok - {what}", flush=True)

    def not_ok(self, what, why):
        self.failed += 1
        print(f"not ok - {what}: {why}", flush=True)

    def skip(self, what, why):
        self.skipped += 1
        print(f"skip - {what}: {why}", flush=True)

    def run(self, what, fn):
        """Runs `fn`; it returns a detail string (or None) on success and raises on failure."""
        t0 = time.monotonic()
        try:
            detail = fn()
        except (CheckFailed, HarnessError, AssertionError) as e:
            self.not_ok(what, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False
        dt = time.monotonic() - t0
        self.ok(f"{what} ({detail + ', ' if detail else ''}{dt:.1f} s)")
        return True

    def summary(self):
        line = f"{self.passed} passed, {self.failed} failed"
        if self.skipped:
            line += f", {self.skipped} skipped"
        return line


# ---------------------------------------------------------------------------------------------
# Users through the client API
# ---------------------------------------------------------------------------------------------


class WorkerSyncLog(SyncLog):
    """`harness.SyncLog` plus device-list changes, tolerant of limited timelines (messages are
    checked per event id instead)."""

    def __init__(self):
        super().__init__()
        self.device_lists_changed = []  # (sync number, user id)
        self.syncs = 0

    def add(self, body):
        self.syncs += 1
        for user in body.get("device_lists", {}).get("changed", []):
            self.device_lists_changed.append((self.syncs, user))
        self.to_device.extend(body.get("to_device", {}).get("events", []))
        self.presence.extend(body.get("presence", {}).get("events", []))
        for room_id, room in body.get("rooms", {}).get("join", {}).items():
            self.timeline.setdefault(room_id, []).extend(room.get("timeline", {}).get("events", []))
            self.ephemeral.setdefault(room_id, []).extend(room.get("ephemeral", {}).get("events", []))


class User(Client):
    """A user of one homeserver through its client API."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = WorkerSyncLog()
        self._txn = 0

    def call(self, method, path, body=None, ok=(200,), **params):
        r = self.session.request(method, self._url(path), json=body, params=params or None, timeout=30)
        if r.status_code not in ok:
            raise HarnessError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else {}

    def txn(self):
        self._txn += 1
        return f"w{now_ms():x}.{self._txn}"

    def invite(self, room_id, user_id):
        self.call("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/invite", {"user_id": user_id})

    def join(self, room_id, via):
        return self.call("POST", f"/_matrix/client/v3/join/{q(room_id)}", {}, server_name=via)["room_id"]

    def send_text(self, room_id, text):
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{self.txn()}"
        return self.call("PUT", path, {"msgtype": "m.text", "body": text})["event_id"]

    def send_text_until_accepted(self, room_id, text, timeout_s):
        """`send_text`, tried again while the server answers 5xx (same transaction id, so at most
        one event): Synapse answers 500 until its pool has replaced the connections a
        PostgreSQL restart cut."""
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{self.txn()}"
        answers = []

        def accepted():
            r = self.session.put(self._url(path), json={"msgtype": "m.text", "body": text}, timeout=30)
            answers.append(r.status_code)
            if r.status_code == 200:
                return r.json()["event_id"]
            if r.status_code < 500:
                raise HarnessError(f"PUT {path}: {r.status_code} {r.text[:300]}")
            return None

        event_id = wait_until(accepted, timeout_s, f"hs1 to accept a message (answers {answers})", interval_s=0.5)
        return event_id, answers

    def put_in_background(self, path, body, method="PUT"):
        """`method` (PUT) on a thread with a session of its own; `join()` gives its status code
        (None if it did not answer). For requests that hang while Redis is down."""
        import threading

        import requests

        session = requests.Session()
        session.headers.update(self.session.headers)
        result = {}

        def run():
            try:
                result["status"] = session.request(method, self._url(path), json=body, timeout=40).status_code
            except requests.RequestException as e:
                result["error"] = type(e).__name__

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def join(timeout_s=45):
            thread.join(timeout_s)
            return result.get("status", result.get("error"))

        return join

    def typing(self, room_id, typing=True):
        body = {"typing": typing, "timeout": 30000} if typing else {"typing": False}
        self.call("PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/typing/{q(self.user_id)}", body)

    def read_receipt(self, room_id, event_id):
        self.call("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", {})

    def set_presence(self, presence, status_msg):
        self.call(
            "PUT", f"/_matrix/client/v3/presence/{q(self.user_id)}/status", {"presence": presence, "status_msg": status_msg}
        )

    def send_to_device(self, event_type, messages):
        self.call("PUT", f"/_matrix/client/v3/sendToDevice/{q(event_type)}/{self.txn()}", {"messages": messages})

    def has_event(self, room_id, event_id):
        r = self.session.get(self._url(f"/_matrix/client/v3/rooms/{q(room_id)}/event/{q(event_id)}"), timeout=30)
        return r.status_code == 200

    def keys_query(self, user_id):
        return self.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {user_id: []}, "timeout": 10000})

    def upload_device_keys(self):
        """Device keys for this device (Synapse lists only devices with keys in /keys/query)."""
        key = signing_key_named("dev")
        key.version = self.device_id
        device_keys = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"ed25519:{self.device_id}": pub(key),
                f"curve25519:{self.device_id}": pub(signing_key_named("curve")),  # any 32 bytes
            },
        }
        self.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": sign(device_keys, self.user_id, key)})

    def upload_cross_signing_keys(self, password):
        """Master, self-signing and user-signing keys (the latter two signed by the master).
        Returns the master key's public part."""
        master = signing_key_named("m")
        master.version = pub(master)
        keys = {"master_key": {"user_id": self.user_id, "usage": ["master"], "keys": {f"ed25519:{pub(master)}": pub(master)}}}
        for field, usage in (("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")):
            k = signing_key_named(usage)
            body = {"user_id": self.user_id, "usage": [usage], "keys": {f"ed25519:{pub(k)}": pub(k)}}
            keys[field] = sign(body, self.user_id, master)
        path = "/_matrix/client/v3/keys/device_signing/upload"
        r = self.session.post(self._url(path), json=keys, timeout=30)
        if r.status_code == 401 and "session" in r.json():
            # User-interactive auth: the password stage.
            keys["auth"] = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.user_id},
                "password": password,
                "session": r.json()["session"],
            }
            r = self.session.post(self._url(path), json=keys, timeout=30)
        if r.status_code != 200:
            raise HarnessError(f"cross-signing upload: {r.status_code} {r.text[:300]}")
        return pub(master)


def q(s):
    return urllib.parse.quote(s, safe="")


def signing_key_named(version):
    from signedjson.key import generate_signing_key

    return generate_signing_key(version)


def pub(key):
    from signedjson.key import encode_verify_key_base64, get_verify_key

    return encode_verify_key_base64(get_verify_key(key))


def sign(obj, signer, key):
    from signedjson.sign import sign_json

    return sign_json(obj, signer, key)


def login(hs, localpart, password, device_id):
    c = hs.login(localpart, password, device_id)
    user = User(hs, c.session.headers["Authorization"][len("Bearer "):], c.user_id, c.device_id)
    return user


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


class Remote:
    """A remote homeserver with its user bob."""

    def __init__(self, hs, bob):
        self.hs = hs
        self.bob = bob


class Deployment:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.services = None
        self.hs1 = None
        self.tap = None
        self.senders = []
        self.remotes = []
        self.python = sys.executable

    def start(self):
        a = self.args
        self.services = Services(self.workdir, a.services_env, private=a.private_services)
        dbname = f"fedsend_worker_{os.getpid()}_{now_ms() % 10**8}"
        self.services.create_database(dbname)
        names = [f"fedsend{i + 1}" for i in range(a.instances)]
        self.hs1 = MainProcess(os.path.join(self.workdir, "hs1"), self.services, dbname, names, python=self.python)
        self.open_tap()
        self.hs1.start()
        for i in range(a.remotes):
            # With several instances, remote i gets a port whose shard owner is instance
            # i mod N, so that every instance owns a destination.
            path = os.path.join(self.workdir, f"hs{i + 2}")
            for _ in range(100):
                hs = RemoteSynapse(path, python=self.python)
                if shard_owner(hs.server_name, names) == names[i % len(names)]:
                    break
                shutil.rmtree(path)
            hs.start()
            self.remotes.append(Remote(hs, None))
        self.senders = [
            SenderInstance(self.hs1, name, "python" if a.switch_from_python else a.sender, fedsend_bin=a.fedsend)
            for name in names
        ]
        for s in self.senders:
            s.start()
        self.hs1.register("alice", "alice-password")
        self.alice = login(self.hs1, "alice", "alice-password", "ALICEDEV")
        for r in self.remotes:
            r.hs.register("bob", "bob-password")
            r.bob = login(r.hs, "bob", "bob-password", "BOBDEV")

    def open_tap(self, append=False):
        """The Redis tap (again, after a Redis restart cut it, adding to the same file)."""
        if self.tap:
            self.tap.close()
        self.tap = RedisTap(
            self.services.redis_host, self.services.redis_port, f"{self.hs1.server_name}*",
            os.path.join(self.workdir, "redis.txt"), append=append,
        )

    def stop_senders(self):
        for s in self.senders:
            s.stop()

    def start_senders(self):
        for s in self.senders:
            s.start()

    def switch_senders(self, kind):
        """Stops every instance and starts the same instance names as `kind` (never both)."""
        self.stop_senders()
        self.senders = [SenderInstance(self.hs1, s.name, kind, fedsend_bin=self.args.fedsend) for s in self.senders]
        self.start_senders()

    def close(self):
        for s in self.senders:
            try:
                s.stop()
            except Exception:  # noqa: BLE001 (cleanup goes on)
                traceback.print_exc()
        for r in self.remotes:
            r.hs.stop()
        if self.hs1:
            self.hs1.stop()
        if self.tap:
            self.tap.close()
        if self.services:
            self.services.close()


# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------


def delivered(remote, room_id, event_ids, timeout_s=DELIVERY_TIMEOUT_S, what="events"):
    missing = list(event_ids)

    def all_there():
        missing[:] = [e for e in missing if not remote.bob.has_event(room_id, e)]
        return not missing

    try:
        wait_until(all_there, timeout_s, what, interval_s=0.2)
    except HarnessError:
        raise CheckFailed(f"{len(missing)} of {len(event_ids)} {what} not on {remote.hs.server_name} after {timeout_s} s")


# Device-list resyncs (`GET /user/devices/`) hs2 makes to hs1 in the device steps of this
# scenario when Synapse's own Python worker is the sender: 1 or 2 in the runs measured with
# `--sender python` (it depends on timing); the larger is the bound.
SYNAPSE_SENDER_RESYNCS = 2


def sync_until(user, predicate, what, timeout_s=DELIVERY_TIMEOUT_S):
    try:
        user.sync_until(predicate, timeout_s, what)
    except HarnessError:
        raise CheckFailed(f"{what}: not seen in {user.user_id}'s /sync within {timeout_s} s")


def count_access(hs, prefix, origin=None):
    """Requests `hs` answered under `prefix` (from `origin` only, when given)."""
    n = 0
    for line in hs.log_lines():
        m = ACCESS_LINE.search(line)
        if m and m.group(3).startswith(prefix) and (origin is None or f"{{{origin}}} Processed" in line):
            n += 1
    return n


def destination_row(hs1, destination):
    rows = hs1.query(
        "SELECT retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering "
        "FROM destinations WHERE destination = %s",
        (destination,),
    )
    return rows[0] if rows else None


# ---------------------------------------------------------------------------------------------
# Faults: Redis restarted, PostgreSQL stopped, malformed replication lines
# ---------------------------------------------------------------------------------------------


def fedsend_alive(d):
    dead = [s.name for s in d.senders if not s.running()]
    if dead:
        raise CheckFailed(f"{', '.join(dead)} exited")


def no_problem_since(d, since_ms):
    """Every instance's /health reports no problem seen at or after `since_ms` (an older one, from
    an earlier check, may still be inside /health's one-minute window)."""
    for s in d.senders:
        status, body = s.health()
        if status != 200 and (status != 503 or body.get("at_ms", since_ms) >= since_ms):
            raise CheckFailed(f"{s.name} /health {status} {body}")


def to_device_arrives(d, remote, tags, what, timeout_s=DELIVERY_TIMEOUT_S):
    alice, bob = d.alice, remote.bob
    want = set(tags)
    sync_until(
        bob,
        lambda s: want <= {e["content"].get("tag") for e in s.to_device if e.get("sender") == alice.user_id},
        what,
        timeout_s=timeout_s,
    )


def fault_checks(d, checks, room_a, tag):
    """The checks of --pg-outage, --redis-restart and --bad-replication, in that order. Returns
    the deferred check that /health recovers after the PostgreSQL outage (it takes a minute, run
    last so that the other checks fill the wait), or None."""
    a = d.args
    hs1, alice, services = d.hs1, d.alice, d.services
    remote = d.remotes[0]
    bob = remote.bob
    health_recovered = None

    if a.pg_outage:
        back = {}

        def pg_outage():
            # The instances are frozen while the messages are stored and announced, and
            # PostgreSQL stops before they wake: the first thing they do then is read the
            # announced events from a database that is down. Each must say so on /health.
            events, tags = [], []
            for s in d.senders:
                s.pause()
            try:
                for i in range(3):
                    events.append(alice.send_text(room_a, f"before the PostgreSQL outage {i} {tag}"))
                tags.append(f"pg outage {tag}")
                alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": tags[-1]}}})
                services.stop_postgres()
                t_down = time.monotonic()
            finally:
                for s in d.senders:
                    s.resume()
            problems = {}

            def degraded():
                for s in d.senders:
                    status, body = s.health()
                    if status == 503 and body.get("problem"):
                        problems[s.name] = body["problem"]
                return len(problems) == len(d.senders)

            try:
                wait_until(degraded, 20, "/health 503 on every instance", interval_s=0.2)
            except HarnessError:
                raise CheckFailed(f"/health not 503 with a problem on every instance while PostgreSQL is down: {problems}")
            time.sleep(max(0.0, SERVICE_DOWN_S - (time.monotonic() - t_down)))
            fedsend_alive(d)
            services.start_postgres()
            back["ms"] = now_ms()
            back["t"] = time.monotonic()
            down_s = back["t"] - t_down
            for r in d.remotes:
                delivered(r, room_a, events, timeout_s=OUTAGE_TIMEOUT_S, what="messages sent just before the outage")
            to_device_arrives(d, remote, tags, "the to-device message sent just before the outage", OUTAGE_TIMEOUT_S)
            # The main process recovers too (after answering 500 while its pool had cut
            # connections), and the instances deliver what it stores next.
            ev, answers = alice.send_text_until_accepted(room_a, f"after the PostgreSQL outage {tag}", 30)
            for r in d.remotes:
                delivered(r, room_a, [ev], what="a message sent after the outage")
            fedsend_alive(d)
            back["main"] = f"hs1 answered {answers} to the next message, delivered"
            first = next(iter(problems.values()))
            return (f"PostgreSQL down {down_s:.1f} s; /health 503 on every instance ({first[:80]!r}); "
                    f"{len(events)} messages and a to-device message delivered "
                    f"{time.monotonic() - back['t']:.1f} s after it came back; {back['main']}")

        if checks.run("PostgreSQL stopped under fresh work: /health 503, no crash, everything delivered once it is back",
                      pg_outage):
            def health_recovered():
                def healthy():
                    fedsend_alive(d)
                    return all(s.health()[0] == 200 for s in d.senders)

                left = HEALTH_RECOVERY_S - (time.monotonic() - back["t"])
                try:
                    wait_until(healthy, max(left, 1), "/health 200", interval_s=0.5)
                except HarnessError:
                    raise CheckFailed(f"/health: {[(s.name, *s.health()) for s in d.senders]} "
                                      f"{HEALTH_RECOVERY_S} s after PostgreSQL came back")
                return f"{time.monotonic() - back['t']:.0f} s after PostgreSQL came back"

    if a.redis_restart:
        def redis_restart():
            # Reads that failed during a PostgreSQL outage are retried by the instances every
            # FEED_RETRY_S; one still pending would read the events position and find the
            # message this check sends while Redis is down, before Redis is back.
            if a.pg_outage and "t" in back:
                time.sleep(max(0.0, FEED_RETRY_S + 1 - (time.monotonic() - back["t"])))
            since = now_ms()
            marks = {s.name: s.log_size() for s in d.senders}
            services.kill_redis()
            t_down = time.monotonic()
            text, td_tag = f"while Redis is down {tag}", f"redis down {tag}"
            try:
                # Synapse's main process stores both but cannot announce them. Its client
                # requests then hang until Redis is back (its Redis client waits for the
                # connection), hence the threads; the database shows what it stored.
                answers = [
                    alice.put_in_background(
                        f"/_matrix/client/v3/rooms/{q(room_a)}/send/m.room.message/{alice.txn()}",
                        {"msgtype": "m.text", "body": text},
                    ),
                    alice.put_in_background(
                        f"/_matrix/client/v3/sendToDevice/m.worker.test/{alice.txn()}",
                        {"messages": {bob.user_id: {bob.device_id: {"tag": td_tag}}}},
                    ),
                ]

                def stored():
                    ev = hs1.query("SELECT event_id FROM event_json WHERE json LIKE %s", (f"%{text}%",))
                    outbox = hs1.query(
                        "SELECT count(*) FROM device_federation_outbox WHERE destination = %s AND messages_json LIKE %s",
                        (remote.hs.server_name, f"%{td_tag}%"),
                    )[0][0]
                    return ev[0][0] if ev and outbox else None

                try:
                    ev = wait_until(stored, 10, "hs1 to store the message and the to-device message", interval_s=0.2)
                except HarnessError:
                    raise CheckFailed("hs1 did not store the message and the to-device message while Redis was down")
                # Receipts travel in replication rows, not as a doorbell: the instances must
                # read this one back from the database once they see what they missed.
                answers.append(alice.put_in_background(
                    f"/_matrix/client/v3/rooms/{q(room_a)}/receipt/m.read/{q(ev)}", {}, method="POST"))

                def receipt_stored():
                    return hs1.query(
                        "SELECT count(*) FROM receipts_linearized WHERE event_id = %s AND user_id = %s",
                        (ev, alice.user_id),
                    )[0][0]

                try:
                    wait_until(receipt_stored, 10, "hs1 to store the read receipt", interval_s=0.2)
                except HarnessError:
                    raise CheckFailed("hs1 did not store the read receipt while Redis was down")
                time.sleep(max(0.0, SERVICE_DOWN_S - (time.monotonic() - t_down)))
                if any(r.bob.has_event(room_a, ev) for r in d.remotes):
                    raise CheckFailed("the message sent while Redis was down arrived before Redis came back")
            finally:
                services.start_redis()
                d.open_tap(append=True)
            down_s = time.monotonic() - t_down

            def reconnected():
                fedsend_alive(d)
                return all(
                    "replication connected reconnection=true" in s.log_since(marks[s.name])
                    and "sent REPLICATE" in s.log_since(marks[s.name])
                    for s in d.senders
                )

            try:
                wait_until(reconnected, 30, "every instance to reconnect", interval_s=0.2)
            except HarnessError:
                raise CheckFailed("not every instance logged `replication connected reconnection=true` and "
                                  "REPLICATE within 30 s of Redis coming back")
            # Nothing new is announced: the instances must read what was stored meanwhile.
            for r in d.remotes:
                delivered(r, room_a, [ev], what="the message sent while Redis was down")
            to_device_arrives(d, remote, [td_tag], "the to-device message sent while Redis was down")
            sync_until(
                remote.bob,
                lambda s: any(
                    e["type"] == "m.receipt" and alice.user_id in e["content"].get(ev, {}).get("m.read", {})
                    for e in s.ephemeral.get(room_a, [])
                ),
                "alice's read receipt sent while Redis was down",
            )
            no_problem_since(d, since)
            statuses = [join() for join in answers]
            return (f"Redis down {down_s:.1f} s; every instance reconnected and caught up; "
                    f"hs1 answered the three requests made meanwhile with {statuses}")

        checks.run("Redis killed (-9) and restarted: the instances reconnect and deliver what was stored meanwhile",
                   redis_restart)

        def main_reconnected():
            # Each instance holds one subscription; the other is the main process's.
            want = 1 + len(d.senders)
            try:
                wait_until(lambda: hs1.subscribers() == want, 30, "the main process to subscribe again", interval_s=0.2)
            except HarnessError:
                raise CheckFailed(f"{hs1.subscribers()} subscribers on hs1's channel, expected {want}")
            # And it announces again: a new message reaches the remotes through replication.
            ev = alice.send_text(room_a, f"after Redis came back {tag}")
            for r in d.remotes:
                delivered(r, room_a, [ev], what="a message sent after Redis came back")
            return f"{want} subscribers; a new message delivered"

        checks.run("after the Redis restart, the main process is subscribed and announces again", main_reconnected)

    if a.bad_replication:
        def bad_replication():
            since = now_ms()
            marks = {s.name: s.log_size() for s in d.senders}
            rng = random.Random(7)
            lines = [
                b"RDATA events master notanumber [1]",
                b"RDATA unknown_stream master 5 []",
                b'RDATA typing master 5 {"not":"a row"}',
                b"RDATA events master 5 [1]",
                b"RDATA receipts master 5 not json",
                b"POSITION events master x y",
                b"POSITION events master 1",
                b"FEDERATION_ACK",
                b"REMOTE_SERVER_UP",
                bytes(rng.randrange(256) for _ in range(200)),  # random bytes, not UTF-8
                b"",
                b"RDATA events master 5 " + b"[" * 50_000 + b"]" * 50_000,  # 100 KB, nested far too deep
                b"X" * 100_000,  # 100 KB, no command at all
            ]
            for line in lines:
                services.redis("PUBLISH", hs1.server_name, line)
            # Every instance saw them (they are logged as skipped), then a normal message.
            try:
                wait_until(
                    lambda: all(s.log_since(marks[s.name]).count("skipping") >= 8 for s in d.senders),
                    20, "the instances to skip the lines", interval_s=0.2,
                )
            except HarnessError:
                counts = {s.name: s.log_since(marks[s.name]).count("skipping") for s in d.senders}
                raise CheckFailed(f"skipped lines logged per instance: {counts}, expected at least 8 each")
            fedsend_alive(d)
            # Whoever can publish on the channel must not be able to write without bound into
            # every instance's log (the 100 KB lines are cut when logged).
            longest = max(len(line) for s in d.senders for line in s.log_since(marks[s.name]).splitlines())
            if longest > LOG_LINE_MAX:
                raise CheckFailed(f"an instance logged a line of {longest} characters for a malformed line")
            ev = alice.send_text(room_a, f"after the malformed lines {tag}")
            for r in d.remotes:
                delivered(r, room_a, [ev], what="a message after the malformed lines")
            fedsend_alive(d)
            no_problem_since(d, since)
            return f"{len(lines)} malformed lines published; still running, a message delivered after them"

        checks.run("malformed replication lines are skipped: no crash, the next message is delivered", bad_replication)

    return health_recovered



def scenario(d, checks):
    a = d.args
    hs1, alice = d.hs1, d.alice
    remote = d.remotes[0]
    hs2, bob = remote.hs, remote.bob
    tag = f"{now_ms():x}"
    rooms = {}

    # -- rooms (invites and joins go between main and hs2 directly, not through the sender) ---
    def make_rooms():
        for name in ("A", "B"):
            room_id = alice.create_room(f"worker {name}")
            for r in d.remotes:
                alice.invite(room_id, r.bob.user_id)
                r.bob.join(room_id, hs1.server_name)
            rooms[name] = room_id
        return f"{len(rooms)} rooms, {len(d.remotes)} remote(s) joined"

    if not checks.run("alice creates two rooms, bob on hs2 joins both", make_rooms):
        return
    bob.sync_once()  # start bob's sync chain after the joins
    room_a, room_b = rooms["A"], rooms["B"]

    def messages():
        ev_a = alice.send_text(room_a, f"hello A {tag}")
        ev_b = alice.send_text(room_b, f"hello B {tag}")
        for r in d.remotes:
            delivered(r, room_a, [ev_a], what="message in room A")
            delivered(r, room_b, [ev_b], what="message in room B")
        rooms["last_a"] = ev_a
        return "one message in each room"

    checks.run("messages in two rooms reach hs2", messages)

    if a.switch_from_python:
        def switch():
            before = dict(
                ((t, i), v) for t, i, v in hs1.query("SELECT type, instance_name, stream_id FROM federation_stream_position")
            )
            d.switch_senders(a.sender)
            ev = alice.send_text(room_a, f"after the switch {tag}")
            delivered(remote, room_a, [ev], what="first message after the switch")
            resent = ""
            if a.sender == "fedsend":
                # Nothing the old sender delivered goes again: the new one sent exactly the one
                # event created since (its log has a line per delivered transaction).
                time.sleep(1)
                pdus = sum(s.pdus_sent_to(hs2.server_name) for s in d.senders)
                if pdus != 1:
                    raise AssertionError(f"fedsend sent {pdus} PDUs to {hs2.server_name} after the switch, expected 1")
                resent = "; 1 PDU sent to hs2 since the switch (nothing resent)"
            return f"{a.sender} took over {', '.join(s.name for s in d.senders)}; positions before: {before}{resent}"

        checks.run("switch from Synapse's own sender instance: the next message arrives", switch)

    def typing():
        alice.typing(room_a, True)
        sync_until(
            bob,
            lambda s: any(
                e["type"] == "m.typing" and alice.user_id in e["content"].get("user_ids", [])
                for e in s.ephemeral.get(room_a, [])
            ),
            "alice typing",
        )

    checks.run("typing reaches hs2", typing)

    def receipt():
        event_id = rooms.get("last_a") or alice.send_text(room_a, "to be read")
        alice.read_receipt(room_a, event_id)
        sync_until(
            bob,
            lambda s: any(
                e["type"] == "m.receipt" and alice.user_id in e["content"].get(event_id, {}).get("m.read", {})
                for e in s.ephemeral.get(room_a, [])
            ),
            "alice's read receipt",
        )

    checks.run("read receipt reaches hs2", receipt)

    def presence():
        status = f"busy {tag}"
        alice.set_presence("online", status)
        sync_until(
            bob,
            lambda s: any(
                e.get("sender") == alice.user_id and e["content"].get("status_msg") == status for e in s.presence
            ),
            "alice's presence",
        )

    checks.run("presence reaches hs2", presence)

    def to_device():
        alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": tag}}})
        sync_until(
            bob,
            lambda s: any(
                e.get("sender") == alice.user_id and e["content"].get("tag") == tag for e in s.to_device
            ),
            "alice's to-device message",
        )

    checks.run("to-device message reaches bob's device", to_device)

    def device_changed_since(mark):
        return lambda s: any(n > mark and u == alice.user_id for n, u in s.device_lists_changed)

    def new_device():
        mark = bob.seen.syncs
        alice2 = login(hs1, "alice", "alice-password", "ALICE2")
        alice2.upload_device_keys()
        sync_until(bob, device_changed_since(mark), "alice in bob's device_lists.changed")

        def listed():
            devices = bob.keys_query(alice.user_id).get("device_keys", {}).get(alice.user_id, {})
            return "ALICE2" in devices

        wait_until(listed, DELIVERY_TIMEOUT_S, "ALICE2 in bob's /keys/query", interval_s=0.3)

    checks.run("alice's new device: device_lists.changed on hs2 and in /keys/query", new_device)

    def cross_signing():
        mark = bob.seen.syncs
        master = alice.upload_cross_signing_keys("alice-password")
        sync_until(bob, device_changed_since(mark), "alice in bob's device_lists.changed after the upload")

        def listed():
            r = bob.keys_query(alice.user_id)
            keys = r.get("master_keys", {}).get(alice.user_id, {}).get("keys", {})
            return f"ed25519:{master}" in keys and alice.user_id in r.get("self_signing_keys", {})

        wait_until(listed, DELIVERY_TIMEOUT_S, "alice's master/self-signing keys in bob's /keys/query", interval_s=0.3)

    checks.run("alice's cross-signing keys: device_lists.changed on hs2 and in /keys/query", cross_signing)

    resyncs = count_access(hs1, "/_matrix/federation/v1/user/devices/", hs2.server_name)
    key_queries = count_access(hs1, "/_matrix/federation/v1/user/keys/query", hs2.server_name)
    print(f"# device-list resyncs hs2 made to hs1: {resyncs} (GET /user/devices/); key queries: {key_queries}", flush=True)

    def resync_count():
        # A sender must not make the remote resync more than Synapse's own sender does.
        if resyncs > SYNAPSE_SENDER_RESYNCS:
            raise CheckFailed(f"{resyncs} device-list resyncs, Synapse's own sender causes {SYNAPSE_SENDER_RESYNCS}")
        return f"{resyncs} resyncs, Synapse's own sender causes {SYNAPSE_SENDER_RESYNCS}"

    checks.run("device-list resyncs by hs2: no more than with Synapse's own sender", resync_count)

    # -- negative control and the backlog at start-up ------------------------------------------
    def negative():
        d.stop_senders()
        wait_until(lambda: hs1.subscribers() == 1, 20, "only the main process on hs1's channel")
        ev = alice.send_text(room_a, f"while no sender runs {tag}")
        rooms["backlog"] = ev
        time.sleep(NEGATIVE_WAIT_S)
        if bob.has_event(room_a, ev):
            raise CheckFailed("the message reached hs2 although no sender instance ran (main sends?)")
        return f"not on hs2 after {NEGATIVE_WAIT_S} s"

    if checks.run("with the sender stopped, a message stays on hs1", negative):
        d.start_senders()
        ev = rooms["backlog"]
        wait_s = BACKLOG_WAIT_PYTHON_S if a.sender == "python" else BACKLOG_WAIT_FEDSEND_S
        t0 = time.monotonic()
        try:
            wait_until(lambda: bob.has_event(room_a, ev), wait_s, "the backlog", interval_s=0.2)
            checks.ok(f"after the sender starts, the backlog arrives without a further event ({time.monotonic() - t0:.1f} s)")
        except HarnessError:
            what = "after the sender starts, the backlog arrives without a further event"
            if a.sender == "python":
                checks.skip(what, f"Synapse's worker did not send it within {wait_s} s (known: it waits for the next event)")
            else:
                checks.not_ok(what, f"not on hs2 {wait_s} s after the sender started")
            nudge = alice.send_text(room_a, f"nudge {tag}")
            checks.run(
                "a further event brings the backlog and itself",
                lambda: delivered(remote, room_a, [ev, nudge], what="backlog + nudge"),
            )
    else:
        if not all(s.running() for s in d.senders):
            d.start_senders()

    # -- outage of hs2 --------------------------------------------------------------------------
    outage_events = []

    def outage_backoff():
        hs2.stop()
        for i in range(3):
            outage_events.append(alice.send_text(room_a, f"during the outage {i} {tag}"))

        def backed_off():
            row = destination_row(hs1, hs2.server_name)
            return row if row and row[0] and row[1] and row[2] else None

        row = wait_until(backed_off, OUTAGE_TIMEOUT_S, f"retry timings for {hs2.server_name}", interval_s=0.3)
        return f"retry_last_ts={row[0]} retry_interval={row[1]} ms failure_ts={row[2]}"

    if checks.run("hs2 down: hs1's destinations row for hs2 gets retry timings", outage_backoff):
        # A to-device message queued while hs2 is down waits in device_federation_outbox.
        alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": f"outage {tag}"}}})

        def marked_up():
            hs2.start()
            # hs2 contacting hs1 (bob's typing notification) makes hs1's main process clear the
            # backoff in the database ("Marking origin as up"); the main process does not publish
            # REMOTE_SERVER_UP (only workers do), so nothing wakes the destination on the sender.
            bob.typing(room_a, True)

            def cleared():
                row = destination_row(hs1, hs2.server_name)
                return row is not None and not row[0] and not row[1]

            wait_until(cleared, DELIVERY_TIMEOUT_S, "hs1 to clear hs2's retry timings", interval_s=0.2)

        checks.run("hs2 back and contacting hs1: hs1 clears hs2's retry timings", marked_up)

        def catch_up():
            # Synapse's worker needs new traffic for hs2 that is not a PDU (a to-device message)
            # to wake its queue, and then catches up on the PDUs from destination_rooms. fedsend
            # wakes hs2 as soon as the main process's invalidation of hs2's retry timings says it
            # is up, so in fedsend mode the outage is caught up before anything else is sent.
            if a.sender != "fedsend":
                alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": f"after {tag}"}}})
            delivered(remote, room_a, outage_events, timeout_s=OUTAGE_TIMEOUT_S, what="messages sent during the outage")
            if a.sender == "fedsend":
                alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": f"after {tag}"}}})
            want = {f"outage {tag}", f"after {tag}"}
            sync_until(
                bob,
                lambda s: want <= {e["content"].get("tag") for e in s.to_device if e.get("sender") == alice.user_id},
                "both to-device messages",
            )
            return f"{len(outage_events)} messages, 2 to-device messages"

        checks.run(
            "hs2 catches up on everything sent during the outage"
            + (" once hs1 marks it up, before any new traffic" if a.sender == "fedsend" else " on new traffic"),
            catch_up,
        )

        def cleared():
            last = hs1.query("SELECT stream_ordering FROM events WHERE event_id = %s", (outage_events[-1],))[0][0]

            def ok():
                row = destination_row(hs1, hs2.server_name)
                return row if row and not row[0] and not row[1] and row[2] is None and (row[3] or 0) >= last else None

            try:
                row = wait_until(ok, DELIVERY_TIMEOUT_S, "cleared retry timings", interval_s=0.3)
            except HarnessError:
                raise CheckFailed(f"row is {destination_row(hs1, hs2.server_name)}; last outage event at {last}")
            return f"last_successful_stream_ordering={row[3]}"

        checks.run("hs1's destinations row for hs2: no retry timings, position past the outage", cleared)
        up = [l for l in d.tap.lines() if f"REMOTE_SERVER_UP {hs2.server_name}" in l]
        print(f"# REMOTE_SERVER_UP {hs2.server_name} published on Redis: {len(up)} time(s)", flush=True)

    # -- kill -9 of the sender during a burst of messages -----------------------------------
    if a.kill9:
        def kill9():
            burst = []
            owner = shard_owner(hs2.server_name, [s.name for s in d.senders])
            victim = next(s for s in d.senders if s.name == owner)  # the one sending to hs2
            n, kill_at = 40, 10
            to_device_tags = []
            for i in range(n):
                burst.append(alice.send_text(room_a, f"burst {i} {tag}"))
                if i % 4 == 0:
                    to_device_tags.append(f"burst {i} {tag}")
                    alice.send_to_device("m.worker.test", {bob.user_id: {bob.device_id: {"tag": to_device_tags[-1]}}})
                if i == kill_at:
                    victim.stop(signal.SIGKILL)
                    victim.start()
                time.sleep(0.05)
            delivered(remote, room_a, burst, timeout_s=OUTAGE_TIMEOUT_S, what="burst messages")
            want = set(to_device_tags)
            sync_until(
                bob,
                lambda s: want <= {e["content"].get("tag") for e in s.to_device if e.get("sender") == alice.user_id},
                "the burst's to-device messages",
                timeout_s=OUTAGE_TIMEOUT_S,
            )
            bob.sync_drain(quiet_s=2)  # a duplicate would arrive by now
            counts = {}
            for e in bob.seen.to_device:
                if e.get("sender") == alice.user_id and e["content"].get("tag") in want:
                    counts[e["content"]["tag"]] = counts.get(e["content"]["tag"], 0) + 1
            twice = {t: c for t, c in counts.items() if c != 1}
            if twice:
                raise AssertionError(f"to-device messages not delivered exactly once: {twice}")
            return (f"{n} messages and {len(want)} to-device messages (each exactly once), "
                    f"{victim.name} killed after message {kill_at + 1} and restarted")

        checks.run("kill -9 of the sender during a burst: every message arrives", kill9)

    health_recovered = fault_checks(d, checks, room_a, tag)

    # -- the sender's bookkeeping in hs1's database ---------------------------------------------
    def positions():
        rows = hs1.query("SELECT type, instance_name, stream_id FROM federation_stream_position ORDER BY 1, 2")
        names = {s.name for s in d.senders}
        have = {(t, i) for t, i, _ in rows}
        missing = [(t, n) for n in names for t in ("events", "federation") if (t, n) not in have]
        if missing:
            raise CheckFailed(f"no federation_stream_position rows {missing}; rows: {rows}")
        (max_so,) = hs1.query("SELECT max(stream_ordering) FROM events")[0]

        def caught_up():
            rows = hs1.query(
                "SELECT min(stream_id) FROM federation_stream_position WHERE type = 'events' AND instance_name = ANY(%s)",
                (list(names),),
            )
            return rows[0][0] is not None and rows[0][0] >= max_so

        try:
            wait_until(caught_up, DELIVERY_TIMEOUT_S, "events position", interval_s=0.3)
        except HarnessError:
            raise CheckFailed(f"events positions {rows} behind max stream_ordering {max_so}")
        return f"events position reached {max_so}"

    checks.run("federation_stream_position: rows for every instance, events position caught up", positions)

    def outboxes_empty():
        def empty():
            dm = hs1.query("SELECT count(*) FROM device_federation_outbox WHERE destination = %s", (hs2.server_name,))[0][0]
            pokes = hs1.query(
                "SELECT count(*) FROM device_lists_outbound_pokes WHERE destination = %s", (hs2.server_name,)
            )[0][0]
            return (dm, pokes) == (0, 0) or None

        try:
            wait_until(empty, DELIVERY_TIMEOUT_S, "empty outboxes", interval_s=0.3)
        except HarnessError:
            raise CheckFailed("device_federation_outbox / device_lists_outbound_pokes still hold rows for hs2")

    checks.run("device_federation_outbox and device_lists_outbound_pokes empty for hs2", outboxes_empty)

    def clean_logs():
        problems = []
        for r in d.remotes:
            problems += r.hs.log_problems()
        if problems:
            raise CheckFailed(f"{len(problems)} refused requests on the remotes, e.g. {problems[0][-200:]}")

    checks.run("the remotes refused nothing (no 401, 429, oversized transaction)", clean_logs)

    def main_sent_nothing():
        sends = [l for l in hs1.log_lines() if "matrixfederationclient" in l and "/_matrix/federation/v1/send/" in l]
        if sends:
            raise CheckFailed(f"{len(sends)} outbound /send lines in the main process's log, e.g. {sends[0][-160:]}")

    checks.run("hs1's main process itself sent no transaction", main_sent_nothing)

    # -- sharding over several instances --------------------------------------------------------
    if len(d.senders) > 1:
        names = [s.name for s in d.senders]

        def sharding():
            # Something to send to every remote, then look at who sent it.
            ev = alice.send_text(room_a, f"sharding {tag}")
            for r in d.remotes:
                delivered(r, room_a, [ev], what="sharding message")
            out = []
            for r in d.remotes:
                owner = shard_owner(r.hs.server_name, names)
                senders = [s.name for s in d.senders if s.sent_to(r.hs.server_name)]
                if senders != [owner]:
                    raise CheckFailed(f"{r.hs.server_name}: owner {owner}, sent by {senders}")
                out.append(f"{r.hs.server_name}->{owner}")
            return ", ".join(out)

        checks.run("sharding: each destination is sent to only by its owner (sha256 LE mod N)", sharding)

    if health_recovered:
        checks.run("after the PostgreSQL outage, every instance's /health is 200 again", health_recovered)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sender", choices=["python", "fedsend"], default="python")
    parser.add_argument("--fedsend", default=os.path.join(ROOT, "target", "release", "fedsend"), help="fedsend binary")
    parser.add_argument("--instances", type=int, default=1, help="sender instances fedsend1..N (default 1)")
    parser.add_argument("--remotes", type=int, default=1, help="remote homeservers hs2.. (default 1)")
    parser.add_argument("--kill9", action="store_true", help="also: kill -9 the sender during a burst of messages")
    parser.add_argument(
        "--switch-from-python",
        action="store_true",
        help="start Synapse's own worker as the instances first, then switch them to --sender",
    )
    parser.add_argument(
        "--redis-restart", action="store_true",
        help="also: kill -9 Redis, send while it is down, start it again; the instances must catch up",
    )
    parser.add_argument(
        "--pg-outage", action="store_true",
        help="also: stop PostgreSQL for a few seconds under fresh work; /health, no crash, delivery after",
    )
    parser.add_argument(
        "--bad-replication", action="store_true",
        help="also: publish malformed lines on hs1's channel; the instances must skip them",
    )
    parser.add_argument(
        "--private-services", action="store_true",
        help="start a private PostgreSQL + Redis even when FEDSEND_TEST_* are set",
    )
    parser.add_argument("--services-env", help="a scripts/services.sh env file (default: FEDSEND_TEST_* of the environment)")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory after a pass")
    parser.add_argument("--redis-capture", help="copy the Redis traffic of hs1 to this file at the end")
    args = parser.parse_args()
    if args.sender == "fedsend":
        args.fedsend = os.path.abspath(args.fedsend)
        if not os.access(args.fedsend, os.X_OK):
            print(f"test_worker: {args.fedsend} is not an executable (build it: cargo build --release)", file=sys.stderr)
            return 2

    faults = [o for o, on in (("--redis-restart", args.redis_restart), ("--pg-outage", args.pg_outage),
                              ("--bad-replication", args.bad_replication)) if on]
    if faults and args.sender != "fedsend":
        print(f"test_worker: {', '.join(faults)}: only with --sender fedsend (the checks read its log and /health)", file=sys.stderr)
        return 2
    if (args.redis_restart or args.pg_outage) and os.environ.get("FEDSEND_TEST_PG_PORT") \
            and not (args.services_env or args.private_services):
        # The environment's services may be shared (a developer's long-running pair): only
        # restart ones named for this run or started by it.
        print("test_worker: --redis-restart/--pg-outage restart the services; give this run its own "
              "(--services-env FILE or --private-services)", file=sys.stderr)
        return 2

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fedsend-worker-"))
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    log(f"scratch directory {workdir}; sender {args.sender}, {args.instances} instance(s), {args.remotes} remote(s)")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    checks = Checks()
    d = Deployment(args, workdir)
    t0 = time.monotonic()
    crashed = False
    try:
        d.start()
        log(f"deployment up in {time.monotonic() - t0:.1f} s: hs1 {d.hs1.server_name} (PostgreSQL {d.hs1.dbname}), "
            f"remotes {', '.join(r.hs.server_name for r in d.remotes)}")
        scenario(d, checks)
    except KeyboardInterrupt:
        crashed = True
        print("not ok - interrupted", flush=True)
        checks.failed += 1
    except Exception as e:  # noqa: BLE001 (reported as a failed check, then cleaned up)
        crashed = True
        traceback.print_exc()
        checks.not_ok("the deployment ran", f"{type(e).__name__}: {e}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            d.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.redis_capture and os.path.exists(os.path.join(workdir, "redis.txt")):
        shutil.copyfile(os.path.join(workdir, "redis.txt"), args.redis_capture)
    elapsed = time.monotonic() - t0
    if checks.failed or crashed:
        log(f"failed after {elapsed:.0f} s; logs kept in {workdir}")
    else:
        log(f"done in {elapsed:.0f} s")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(checks.summary(), flush=True)
    return 1 if checks.failed or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
