"""The "fedsend" sending mode of the interop test: `target/release/fedsend serve` is the origin's
federation sender; the test plays the homeserver in front of it and feeds its ingest API.

Checks 1-7 of issue 6 against Synapse: delivery (to-device exactly once, PDUs in order, typing,
receipts, presence), a clean log, an outage of Synapse, a kill -9 of the sender, and the to-device
transaction rate next to a plain sequential client's.
"""

import json
import os
import re
import signal
import subprocess
import time

import requests

from harness import HarnessError, free_port, log, now_ms, tail, wait_until

# Whether the harness serves the origin's key (and its events) over HTTPS on the origin's port.
NEEDS_HARNESS_KEY_SERVER = True

FEDSEND_START_TIMEOUT_S = 30
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TXN_FIELDS = re.compile(r'txn_id="?([^" ]+)"? attempt=(\d+)')


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Fedsend:
    """One `fedsend serve` process with its config, database and log in `workdir`."""

    def __init__(self, workdir, origin, binary=None, engine="native"):
        self.engine = engine
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.origin = origin
        self.binary = binary or os.environ.get("FEDSEND_BIN") or os.path.join(repo_root(), "target", "release", "fedsend")
        if not os.access(self.binary, os.X_OK):
            raise HarnessError(f"{self.binary} is missing; build it with `cargo build --release -p fedsend-host-native`")
        self.api_port = free_port()
        self.token = "interop-ingest-token"
        self.log_path = os.path.join(self.workdir, "fedsend.log")
        self.config_path = os.path.join(self.workdir, "fedsend.toml")
        self.proc = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        self._write_config()

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.api_port}"

    def _write_config(self):
        q = json.dumps  # a JSON string is a TOML basic string
        lines = [
            f"server_name = {q(self.origin.server_name)}",
            f"signing_key_file = {q(self.origin.signing_key_path)}",
            'database = "fedsend.db"',
            "",
            "[ingest]",
            f'listen = "127.0.0.1:{self.api_port}"',
            f"token = {q(self.token)}",
            "",
            "[transport]",
            # Synapse's federation listener has a self-signed certificate, on loopback.
            "verify_tls = false",
            'ip_allowlist = ["127.0.0.1/32"]',
            "connect_timeout_ms = 2000",
            "request_timeout_ms = 20000",
            "",
            # Short in-transaction retries, so the backoff starts within seconds of Synapse going
            # down (check 5), and a backoff of a minute, so that only `remote_up` ends it in time.
            "[sender]",
            "http_retries_max = 2",
            "http_retry_delay_max_ms = 1000",
            "retry_interval_min_ms = 60000",
        ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    # -- the ingest API --------------------------------------------------------------------

    def call(self, method, path, body=None, ok=(200,)):
        r = self.session.request(method, self.api_url + path, json=body, timeout=60)
        if r.status_code not in ok:
            raise HarnessError(f"fedsend {method} {path}: {r.status_code} {r.text}")
        return r.json()

    def destination(self, server_name):
        """The sender's view of a destination (None before it has one)."""
        r = self.session.get(f"{self.api_url}/_fedsend/v1/destinations/{server_name}", timeout=30)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise HarnessError(f"fedsend destination {server_name}: {r.status_code} {r.text}")
        return r.json()

    def attempts(self):
        """(txn id, attempt) of every transaction fedsend started, from its debug log."""
        out = []
        with open(self.log_path, "rb") as f:
            for line in f.read().decode("utf8", "replace").splitlines():
                line = ANSI.sub("", line)
                if "sending transaction" in line:
                    m = TXN_FIELDS.search(line)
                    if m:
                        out.append((m.group(1), int(m.group(2))))
        return out

    def start(self):
        t0 = time.monotonic()
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--config", self.config_path, "--engine", self.engine],
            cwd=self.workdir,
            # The driver logs each transaction attempt with its txn id at debug level (check 5).
            env=dict(os.environ, RUST_LOG="info,fedsend_service::serve::driver=debug", NO_COLOR="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()

        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(f"fedsend serve exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                return requests.get(self.api_url + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, FEDSEND_START_TIMEOUT_S, "fedsend serve's /health")
        log(f"fedsend serve ({self.engine} engine) up in {time.monotonic() - t0:.1f} s (pid {self.proc.pid})")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FedsendSender:
    """The sending interface of the test (see HarnessSender) on top of the ingest API: the test
    is the homeserver, which hands fedsend its events with their routing facts and its EDUs."""

    name = "fedsend"

    def __init__(self, fedsend, world):
        self.fedsend = fedsend
        self.world = world
        self.synapse_name = world.synapse.server_name
        self.hosts = [world.synapse.server_name, world.origin.server_name]

    def introduce_room(self, room_id):
        """What a homeserver's fedsend would have seen of a room it joined: the create event
        (someone else's) and our join (which fedsend then sends too; Synapse already has it)."""
        room = self.world.origin.rooms[room_id]
        self.fedsend.call(
            "POST",
            "/_fedsend/v1/remote_events",
            {"event_id": room.create_id, "pdu": room.create_event, "hosts": [self.synapse_name]},
        )
        for event_id in room.members.values():
            self.pdu(event_id, self.world.origin.events[event_id])

    def pdu(self, event_id, pdu):
        self.fedsend.call("POST", "/_fedsend/v1/events", {"event_id": event_id, "pdu": pdu, "hosts": self.hosts})

    def to_device(self, sender_localpart, event_type, message_id, messages):
        self.fedsend.call(
            "POST",
            "/_fedsend/v1/to_device",
            {
                "sender": self.world.origin.user(sender_localpart),
                "message_type": event_type,
                "message_id": message_id,
                "messages": messages,
            },
        )

    def typing(self, room_id, localpart, typing):
        self.fedsend.call(
            "POST",
            "/_fedsend/v1/typing",
            {"room_id": room_id, "user_id": self.world.origin.user(localpart), "typing": typing, "hosts": self.hosts},
        )

    def receipt(self, room_id, localpart, event_id):
        user = self.world.origin.user(localpart)
        self.fedsend.call(
            "POST",
            "/_fedsend/v1/receipt",
            {
                "receipt": {
                    "room_id": room_id,
                    "receipt_type": "m.read",
                    "user_id": user,
                    "event_id": event_id,
                    "data": {"ts": now_ms()},
                },
                "hosts": self.hosts,
                "event": {"sender": user, "received_ts": now_ms()},
            },
        )

    def presence(self, localpart, presence):
        self.fedsend.call(
            "POST",
            "/_fedsend/v1/presence",
            {
                "states": [
                    {
                        "user_id": self.world.origin.user(localpart),
                        "presence": presence,
                        "last_active_ts": now_ms() - 1000,
                        "currently_active": presence == "online",
                    }
                ],
                "destinations": [self.synapse_name],
            },
        )

    def remote_up(self):
        self.fedsend.call("POST", "/_fedsend/v1/remote_up", {"destination": self.synapse_name})

    def flush(self):
        """fedsend sends on its own; nothing to push."""


def wait_idle(fedsend, synapse_name, timeout_s=60):
    """Until fedsend has nothing queued or in flight for Synapse."""

    def idle():
        d = fedsend.destination(synapse_name)
        return d is not None and not d["in_flight"] and d["queued_pdus"] == 0 and d["queued_edus"] == 0

    wait_until(idle, timeout_s, f"fedsend to have nothing queued for {synapse_name}", interval_s=0.2)


def run(world, checks, t, engine="native"):
    """`t` is the test module (its scenario steps and checks); `engine` runs fedsend's core."""
    synapse, origin = world.synapse, world.origin
    fedsend = Fedsend(os.path.join(world.workdir, "fedsend"), origin, engine=engine)
    sender = FedsendSender(fedsend, world)
    room_a, room_b = world.rooms
    world.log_start = synapse.log_size()
    try:
        fedsend.start()
        for room_id in world.rooms:
            sender.introduce_room(room_id)

        # Checks 1-4: a first round with every kind, then rounds over both rooms, paced.
        t.send_round(world, sender, room_a, 3, 5, "f0")
        receipt_event = world.sent_messages[room_a][-1]
        sender.typing(room_a, "alice", True)
        sender.receipt(room_a, "alice", receipt_event)
        sender.presence("alice", "online")
        for r in range(1, 5):
            room_id = room_a if r % 2 else room_b
            t.send_round(world, sender, room_id, 12, 25, f"f{r}")
            t.wait_persisted(world, room_id)
        t.check_delivery(world, checks, (room_a, receipt_event))
        t.check_log(world, checks)

        # Check 5: Synapse down while work arrives; fedsend retries, fails, backs off; Synapse
        # back; a request from Synapse (remote up) ends the backoff; everything arrives.
        wait_idle(fedsend, synapse.server_name)
        synapse.stop()
        mark = len(fedsend.attempts())
        t.send_round(world, sender, room_a, 4, 10, "down-a")
        t.send_round(world, sender, room_b, 4, 10, "down-b")
        receipt_b = world.sent_messages[room_b][-1]
        sender.receipt(room_b, "alice", receipt_b)
        wait_until(
            lambda: (fedsend.destination(synapse.server_name) or {}).get("backoff_until_ts"),
            60,
            "fedsend to back off from the stopped Synapse",
            interval_s=0.2,
        )
        failed = sorted({txn for txn, _ in fedsend.attempts()[mark:]})
        checks.that(failed, f"no 'sending transaction' line in {fedsend.log_path} while Synapse was down")
        synapse.start()
        sender.remote_up()
        t.check_delivery(world, checks, None, receipts=[(room_b, receipt_b)], phase=" (after outage)")
        received = set(t.received_txn_ids(world))
        reused = [txn for txn in failed if txn in received]
        # With catch-up an hour away (the default threshold), a failed transaction must be
        # retried as it is, never rebuilt under a new id.
        checks.that(
            reused == failed,
            f"txn ids tried during the outage that never reached Synapse: {sorted(set(failed) - set(reused))}",
        )
        checks.report(
            f"check 5 outage: {len(failed)} transaction(s) failed while Synapse was down, "
            f"{len(reused)} delivered later under the same txn id; latest events and to-device delivered once"
        )

        # Check 6: kill -9 fedsend right after a round was acknowledged, start it again.
        t.send_round(world, sender, room_a, 6, 20, "kill-a")
        t.send_round(world, sender, room_b, 6, 20, "kill-b")
        fedsend.kill9()
        fedsend.start()
        t.send_round(world, sender, room_a, 2, 5, "after-kill")
        t.check_delivery(world, checks, None, phase=" (after kill -9)")
        overlap = crash_overlap(synapse.log_lines(world.log_start))
        t.check_log(
            world,
            checks,
            excused_txn_ids=overlap,
            note=f" other than {len(overlap)} for a txn of the restarted sender that came while Synapse "
            "still processed the killed one's" if overlap else "",
        )
        checks.report("check 6 restart: fedsend killed with SIGKILL mid-stream and restarted; same end state")

        # Check 7: to-device throughput through fedsend, then a plain sequential client.
        wait_idle(fedsend, synapse.server_name)
        rate_msgs, rate_txns = fedsend_to_device_rate(world, sender)
        fedsend.stop()
        checks.that(fedsend.proc.returncode == 0, f"fedsend serve exited with {fedsend.proc.returncode} on SIGTERM")
        baseline = t.sequential_to_device_rate(world)
        checks.report(
            f"check 7 throughput: fedsend {rate_msgs:.0f} to-device messages/s in {rate_txns:.1f} txn/s; "
            f"sequential client {baseline:.0f} messages/s (1 per txn); ratio {rate_msgs / baseline:.2f}"
        )
    finally:
        fedsend.stop()


OVERLAP = re.compile(r"Received another txn (\S+) from \S+ while still processing (\S+)")


def crash_overlap(lines):
    """Txn ids that Synapse answered 429 because a transaction of the *previous* incarnation
    (txn ids are `{incarnation}.{counter}`) was still being processed: the request of a sender
    killed with SIGKILL lives on in the receiver for a moment, which no sender can see. Two
    transactions of one incarnation at once stay a failure."""
    out = set()
    for line in lines:
        m = OVERLAP.search(line)
        if m and m.group(1).split(".")[0] != m.group(2).split(".")[0]:
            out.add(m.group(1))
    return frozenset(out)


def fedsend_to_device_rate(world, sender, n_messages=300, submitters=8):
    """Messages per second and transactions per second from the first submission until Synapse
    has stored every message, with `submitters` homeserver threads feeding the ingest API."""
    from concurrent.futures import ThreadPoolExecutor

    synapse, origin, bob = world.synapse, world.origin, world.bob
    before = len(world.synapse.query("select 1 from received_transactions where origin = ?", (origin.server_name,)))
    ids = [f"{origin.run_id}-tput-{i}" for i in range(n_messages)]
    t0 = time.monotonic()

    def submit(message_id):
        sender.to_device("alice", "m.interop.test", message_id, {bob.user_id: {bob.device_id: {"ref": message_id}}})

    with ThreadPoolExecutor(submitters) as pool:
        list(pool.map(submit, ids))
    wait_until(
        lambda: synapse.query(
            "select count(*) from device_federation_inbox where origin = ? and message_id like ?",
            (origin.server_name, f"{origin.run_id}-tput-%"),
        )[0][0]
        >= n_messages,
        120,
        "every throughput message in device_federation_inbox",
        interval_s=0.05,
    )
    elapsed = time.monotonic() - t0
    world.sent_to_device.extend(ids)
    after = len(world.synapse.query("select 1 from received_transactions where origin = ?", (origin.server_name,)))
    return n_messages / elapsed, (after - before) / elapsed
