"""Interop test (issue 6): the origin's federation traffic judged by a real Synapse on loopback.

    tools/python/synapse-venv/bin/python interop/test_interop.py [--mode harness|fedsend] [--keep]

The origin's sending is pluggable:

* `harness`: the harness itself PUTs X-Matrix-signed `/send` transactions, one at a time. It
  validates the peer (Synapse config, key server, join, event signing, the observations) without
  fedsend, and gives the baseline of a plain sequential client for the throughput figure.
* `fedsend`: `target/release/fedsend serve` sends; the test hands it events and EDUs through its
  ingest API (see fedsend_sender.py).

Either way the same checks run against what Synapse shows: the user's /sync, its SQLite database,
its metrics and its log. Prints one line per check and a closing `N passed, N failed` line.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

from harness import COUNT_TOO_LARGE, HarnessError, Origin, Synapse, log, now_ms, tail, wait_until

SYNC_TIMEOUT_S = 60


class CheckFailed(Exception):
    pass


class Checks:
    """Counts assertions; the first failed one stops the run (later ones would only cascade)."""

    def __init__(self):
        self.passed = 0
        self.summary = []

    def that(self, condition, what):
        if not condition:
            raise CheckFailed(what)
        self.passed += 1

    def report(self, line):
        self.summary.append(line)
        log(f"ok: {line}")


# ---------------------------------------------------------------------------------------------
# Senders: how the origin's traffic reaches Synapse
# ---------------------------------------------------------------------------------------------


class HarnessSender:
    """The harness as the sender: queues like a homeserver would, and `flush` sends everything
    queued in signed transactions of at most 50 PDUs and 100 EDUs, one at a time."""

    name = "harness"

    def __init__(self, origin, synapse):
        self.origin = origin
        self.synapse = synapse
        self.pdus = []
        self.edus = []
        self.frozen = None  # (txn id, pdus, edus) of a transaction that did not get through
        self.attempts = []  # txn id of every attempt
        self.txn_ids = []  # txn ids that Synapse accepted

    def pdu(self, event_id, pdu):
        self.pdus.append(pdu)

    def to_device(self, sender_localpart, event_type, message_id, messages):
        self.edus.append(self.origin.to_device_edu(sender_localpart, messages, message_id, event_type))

    def typing(self, room_id, localpart, typing):
        self.edus.append(self.origin.typing_edu(room_id, localpart, typing))

    def receipt(self, room_id, localpart, event_id):
        self.edus.append(self.origin.receipt_edu(room_id, localpart, event_id))

    def presence(self, localpart, presence):
        self.edus.append(self.origin.presence_edu(localpart, presence))

    def flush(self):
        """Sends what is queued. A transaction that could not reach Synapse stays frozen and is
        the first one retried, under the same txn id, by the next flush (then this raises)."""
        while self.frozen or self.pdus or self.edus:
            if not self.frozen:
                pdus, self.pdus = self.pdus[:50], self.pdus[50:]
                edus, self.edus = self.edus[:100], self.edus[100:]
                self.frozen = (self.origin.next_txn_id(), pdus, edus)
            txn_id, pdus, edus = self.frozen
            self.attempts.append(txn_id)
            _, status, reply = self.origin.send_transaction(self.synapse, pdus, edus, txn_id=txn_id)
            if status != 200:
                raise CheckFailed(f"/send {txn_id} answered {status} {reply}")
            self.frozen = None
            self.txn_ids.append(txn_id)

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# The world: Synapse, its user, rooms, and the origin joined to them
# ---------------------------------------------------------------------------------------------


class World:
    def __init__(self, workdir, serve_origin_keys=True, room_version=None):
        self.workdir = workdir
        self.synapse = Synapse(os.path.join(workdir, "synapse"))
        self.synapse.start()
        self.synapse.register("bob", "bob-password")
        self.bob = self.synapse.login("bob", "bob-password", "BOBDEV")
        self.origin = Origin(os.path.join(workdir, "origin"))
        if serve_origin_keys:
            self.origin.serve()
        self.rooms = [self.bob.create_room(f"interop {n}", room_version) for n in "AB"]
        for room_id in self.rooms:
            self.origin.join(self.synapse, room_id, "alice")
        log(f"origin {self.origin.server_name}: @alice joined {len(self.rooms)} rooms of {self.synapse.server_name}")
        # What the origin handed to its sender, to compare with what Synapse shows.
        self.sent_messages = {room_id: [] for room_id in self.rooms}  # room -> [event id]
        self.sent_to_device = []  # message ids
        self.log_start = 0

    def close(self):
        self.synapse.stop()
        self.origin.stop_serving()


def send_round(world, sender, room_id, n_messages, n_to_device, tag):
    """`n_messages` messages from @alice in `room_id` and `n_to_device` to-device messages to
    bob's device, handed to the sender."""
    for i in range(n_messages):
        seq = len(world.sent_messages[room_id])
        event_id, pdu = world.origin.make_event(
            room_id, "alice", "m.room.message", {"msgtype": "m.text", "body": f"{tag} {seq}", "seq": seq}
        )
        sender.pdu(event_id, pdu)
        world.sent_messages[room_id].append(event_id)
    for i in range(n_to_device):
        message_id = f"{world.origin.run_id}-{tag}-{i}"
        sender.to_device(
            "alice", "m.interop.test", message_id, {world.bob.user_id: {world.bob.device_id: {"ref": message_id}}}
        )
        world.sent_to_device.append(message_id)


def wait_persisted(world, room_id, timeout_s=SYNC_TIMEOUT_S):
    """Pacing: until Synapse has stored the newest event handed over for `room_id`. Synapse
    prunes a room's inbound staging queue once 100 PDUs wait in it; rounds of a dozen PDUs with
    this wait in between stay far below."""
    last = world.sent_messages[room_id][-1]
    wait_until(
        lambda: world.synapse.query("select 1 from events where event_id = ?", (last,)),
        timeout_s,
        f"event {last} to be persisted",
        interval_s=0.2,
    )


# ---------------------------------------------------------------------------------------------
# Checks 1-4 of issue 6
# ---------------------------------------------------------------------------------------------


def alice_messages(world, room_id):
    alice = world.origin.user("alice")
    return [
        e["event_id"]
        for e in world.bob.seen.timeline.get(room_id, [])
        if e["sender"] == alice and e["type"] == "m.room.message"
    ]


def check_delivery(world, checks, ephemeral_expected, receipts=(), phase=""):
    """Checks 1-3: everything the sender was given shows up for bob, exactly once and in order.
    `ephemeral_expected` is (room, receipted event) for the typing/receipt/presence check or
    None; `receipts` are further (room, event) read receipts of alice that must be stored."""
    synapse, bob, origin = world.synapse, world.bob, world.origin
    alice = origin.user("alice")
    wanted_to_device = set(world.sent_to_device)

    def everything_seen(seen):
        refs = {e["content"].get("ref") for e in seen.to_device}
        if not wanted_to_device <= refs:
            return False
        for room_id, sent in world.sent_messages.items():
            if sent and alice_messages(world, room_id)[-1:] != sent[-1:]:
                return False
        if ephemeral_expected:
            room_id, receipt_event = ephemeral_expected
            eph = seen.ephemeral.get(room_id, [])
            if not any(e["type"] == "m.typing" and alice in e["content"].get("user_ids", []) for e in eph):
                return False
            if not any(e["type"] == "m.receipt" and alice in e["content"].get(receipt_event, {}).get("m.read", {}) for e in eph):
                return False
            if not any(e["sender"] == alice and e["content"].get("presence") == "online" for e in seen.presence):
                return False
        return True

    t0 = time.monotonic()
    bob.sync_until(everything_seen, SYNC_TIMEOUT_S, "every message, event and EDU in bob's /sync")
    # A duplicate would come after the originals: keep syncing until nothing new comes.
    bob.sync_drain()
    log(f"everything seen in /sync after {time.monotonic() - t0:.1f} s")

    # 1. To-device: each message id exactly once in /sync, one row each in the dedup inbox.
    refs = [e["content"].get("ref") for e in bob.seen.to_device if e["sender"] == alice]
    dupes = sorted({r for r in refs if refs.count(r) > 1})
    checks.that(not dupes, f"to-device delivered more than once: {dupes[:5]}")
    checks.that(set(refs) == wanted_to_device, f"to-device not sent but delivered: {sorted(set(refs) - wanted_to_device)[:5]}")
    checks.that(
        all(e["type"] == "m.interop.test" for e in bob.seen.to_device if e["sender"] == alice),
        "to-device type changed on the way",
    )
    inbox = {
        r[0]: r[1]
        for r in synapse.query(
            "select message_id, count(*) from device_federation_inbox where origin = ? group by message_id",
            (origin.server_name,),
        )
    }
    missing = sorted(wanted_to_device - set(inbox))
    checks.that(not missing, f"no device_federation_inbox row for {missing[:5]}")
    checks.that(all(c == 1 for c in inbox.values()), "device_federation_inbox has a message id twice")
    checks.report(
        f"check 1 to-device{phase}: {len(wanted_to_device)} messages, each once in /sync, {len(inbox)} device_federation_inbox rows"
    )

    # 2. PDUs: in order in the timeline, none rejected, staging drained, nothing pruned.
    total = 0
    for room_id, sent in world.sent_messages.items():
        got = alice_messages(world, room_id)
        checks.that(got == sent, f"timeline of {room_id}: {len(got)} of alice's messages, want {len(sent)} in order")
        total += len(sent)
    all_sent = [e for sent in world.sent_messages.values() for e in sent]
    rejected = [
        r for ev in all_sent for r in synapse.query("select event_id, reason from rejections where event_id = ?", (ev,))
    ]
    checks.that(not rejected, f"rejected by Synapse: {rejected[:3]}")
    wait_until(
        lambda: synapse.query("select count(*) from federation_inbound_events_staging")[0][0] == 0,
        SYNC_TIMEOUT_S,
        "Synapse's inbound staging queue to drain",
    )
    checks.that(True, "staging drained")
    pruned = synapse.metric_sum("synapse_federation_server_number_inbound_pdu_pruned_total")
    checks.that(pruned == 0, f"Synapse pruned {pruned} inbound PDUs from its staging queue")
    prune_lines = [l for l in synapse.log_lines() if "from federation queue" in l]
    checks.that(not prune_lines, f"Synapse log: {prune_lines[:1]}")
    checks.report(
        f"check 2 PDUs{phase}: {total} messages in {len(world.sent_messages)} rooms in order in /sync, 0 rejected, "
        f"staging empty, 0 pruned; {origin.events_served} events fetched back by Synapse so far"
    )

    # 3. Typing, read receipt, presence in the ephemeral and presence sections.
    if ephemeral_expected:
        room_id, receipt_event = ephemeral_expected
        rows = synapse.query(
            "select event_id from receipts_linearized where room_id = ? and user_id = ? and receipt_type = 'm.read'",
            (room_id, alice),
        )
        checks.that(rows == [(receipt_event,)], f"receipts_linearized for alice: {rows}")
        checks.report("check 3 EDUs: m.typing and m.receipt in bob's ephemeral, alice online in presence, receipt row stored")
    for room_id, event_id in receipts:
        wait_until(
            lambda: synapse.query(
                "select 1 from receipts_linearized where room_id = ? and user_id = ? and event_id = ?",
                (room_id, alice, event_id),
            ),
            SYNC_TIMEOUT_S,
            f"alice's receipt for {event_id}",
        )
        checks.that(True, "receipt stored")


def check_log(world, checks, excused_txn_ids=frozenset(), note=""):
    """Check 4: no 401, no 400 'count too large', no 429 'Too many concurrent transactions'.
    Lines about `excused_txn_ids` are left out (the caller says why, in `note`)."""

    def excused(line):
        return any(f"send/{t} " in line or f"txn {t} " in line for t in excused_txn_ids)

    problems = [l for l in world.synapse.log_problems(world.log_start) if not excused(l)]
    checks.that(not problems, "Synapse log:\n  " + "\n  ".join(problems[:5]))
    sends = world.synapse.access_lines(world.log_start)
    not_ok = [s for s in sends if s[0] != 200]
    bad = [s for s in not_ok if not excused(f"{s[2]} ")]
    checks.that(not bad, f"/send answers other than 200: {bad[:5]}")
    checks.report(
        f"check 4 log: {len(sends)} /send requests, {len(sends) - len(not_ok)} answered 200; "
        f"no 401, no 'count too large', no 429{note}"
    )
    return len(sends)


# ---------------------------------------------------------------------------------------------
# Harness mode
# ---------------------------------------------------------------------------------------------


def sequential_to_device_rate(world, duration_s=3.0):
    """Transactions per second a plain sequential client gets into this Synapse: one to-device
    message per transaction, the next sent when the previous is answered."""
    origin, synapse, bob = world.origin, world.synapse, world.bob
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < duration_s:
        message_id = f"{origin.run_id}-rate-{n}"
        edu = origin.to_device_edu("alice", {bob.user_id: {bob.device_id: {"ref": message_id}}}, message_id)
        txn_id, status, reply = origin.send_transaction(synapse, edus=[edu])
        if status != 200:
            raise CheckFailed(f"sequential /send {txn_id}: {status} {reply}")
        n += 1
        world.sent_to_device.append(message_id)
    return n / (time.monotonic() - t0)


def received_txn_ids(world):
    """Transaction ids Synapse accepted from the origin (200s only; kept for about a day)."""
    return [
        r[0]
        for r in world.synapse.query(
            "select transaction_id from received_transactions where origin = ? order by ts",
            (world.origin.server_name,),
        )
    ]


def outage_harness(world, checks, sender):
    """Check 5's machinery, with the harness as a simple sender: Synapse is stopped while work
    arrives (PDUs in both rooms, to-device, a receipt), an attempt fails, Synapse comes back,
    the frozen transaction is retried under its id, and everything arrives exactly once."""
    synapse = world.synapse
    room_a, room_b = world.rooms
    synapse.stop()
    checks.that(not synapse.running(), "Synapse stopped")
    send_round(world, sender, room_a, 4, 10, "down-a")
    send_round(world, sender, room_b, 4, 10, "down-b")
    receipt_event = world.sent_messages[room_b][-1]
    sender.receipt(room_b, "alice", receipt_event)
    try:
        sender.flush()
        raise CheckFailed("a transaction reached a stopped Synapse")
    except OSError:
        pass
    frozen_id = sender.frozen[0]
    synapse.start()
    sender.flush()
    checks.that(sender.attempts.count(frozen_id) == 2, f"{frozen_id} attempted twice")
    check_delivery(world, checks, None, receipts=[(room_b, receipt_event)], phase=" (after outage)")
    ids = received_txn_ids(world)
    checks.that(ids.count(frozen_id) == 1, f"received_transactions has {frozen_id} {ids.count(frozen_id)} times")
    checks.that(len(ids) == len(set(ids)), "received_transactions repeats a txn id")
    checks.report(
        f"check 5 outage (harness): Synapse stopped and restarted; {frozen_id} retried under its id; "
        f"latest event of both rooms and every to-device message delivered once"
    )


def run_harness(world, checks):
    synapse, origin, bob = world.synapse, world.origin, world.bob
    sender = HarnessSender(origin, synapse)
    room_a, room_b = world.rooms
    world.log_start = synapse.log_size()

    # First transaction: a PDU, to-device, typing, a read receipt and presence together.
    send_round(world, sender, room_a, 3, 5, "r0")
    receipt_event = world.sent_messages[room_a][-1]
    sender.typing(room_a, "alice", True)
    sender.receipt(room_a, "alice", receipt_event)
    sender.presence("alice", "online")
    sender.flush()
    checks.that(len(sender.txn_ids) == 1, "the first round went in one transaction")
    # Further rounds across both rooms, paced so few PDUs wait in Synapse's staging queue.
    for r in range(1, 5):
        send_round(world, sender, room_a if r % 2 else room_b, 12, 25, f"r{r}")
        sender.flush()
        wait_persisted(world, room_a if r % 2 else room_b)

    # Deduplication, which the exactly-once check relies on: the first transaction again with its
    # id (Synapse answers from its cache), and one to-device message again in a new transaction.
    first = sender.txn_ids[0]
    status = origin.request(synapse, "PUT", f"/_matrix/federation/v1/send/{first}", {
        "origin": origin.server_name, "origin_server_ts": now_ms(), "pdus": [],
        "edus": [origin.to_device_edu("alice", {bob.user_id: {bob.device_id: {"ref": "replayed"}}}, "replayed")],
    })[0]
    checks.that(status == 200, f"replayed transaction {first}: {status}")
    again = world.sent_to_device[0]
    sender.to_device("alice", "m.interop.test", again, {bob.user_id: {bob.device_id: {"ref": again}}})
    sender.flush()

    check_delivery(world, checks, (room_a, receipt_event))
    n_sends = check_log(world, checks)
    checks.that(n_sends == len(sender.txn_ids) + 1, f"{n_sends} /send requests in the access log, sent {len(sender.txn_ids) + 1}")

    # The log scan of check 4 must be able to fail: an unsigned transaction (401) and one with
    # 51 PDUs (400 "count too large") have to show up in it.
    mark = synapse.log_size()
    status, _ = origin.request(synapse, "PUT", f"/_matrix/federation/v1/send/{origin.next_txn_id()}",
                               {"origin": origin.server_name, "origin_server_ts": now_ms(), "pdus": []}, sign=False)
    checks.that(status == 401, f"unsigned /send answered {status}")
    _, status, _ = origin.send_transaction(synapse, pdus=[{}] * 51)
    checks.that(status == 400, f"/send with 51 PDUs answered {status}")
    found = wait_until(lambda: len(synapse.log_problems(mark)) >= 2 and synapse.log_problems(mark), 10, "the log lines")
    checks.that(any(COUNT_TOO_LARGE in l for l in found), "log scan missed 'count too large'")
    checks.that(any(" 401 " in l for l in found), "log scan missed the 401")
    checks.report("check 4 self-test: an unsigned and an oversized /send are caught by the log scan")

    outage_harness(world, checks, sender)

    rate = sequential_to_device_rate(world)
    checks.report(f"check 7 baseline: a plain sequential client gets {rate:.0f} to-device txn/s into Synapse")
    return rate


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["harness", "fedsend"], default="harness")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory after a pass")
    parser.add_argument("--room-version", help="version of the rooms bob creates (default: Synapse's, 12)")
    parser.add_argument("--engine", choices=["native", "wasm"], default="native", help="fedsend serve's engine")
    args = parser.parse_args()

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fedsend-interop-"))
    os.makedirs(workdir, exist_ok=True)
    checks = Checks()
    world = None
    t0 = time.monotonic()
    ok = False
    try:
        if args.mode == "harness":
            world = World(workdir, room_version=args.room_version)
            run_harness(world, checks)
        else:
            import fedsend_sender

            world = World(workdir, serve_origin_keys=fedsend_sender.NEEDS_HARNESS_KEY_SERVER, room_version=args.room_version)
            fedsend_sender.run(world, checks, sys.modules[__name__], engine=args.engine)
        ok = True
    except (CheckFailed, HarnessError) as e:
        log(f"FAILED: {e}")
    except Exception:
        traceback.print_exc()
    finally:
        if world is not None:
            world.close()
    elapsed = time.monotonic() - t0
    print()
    for line in checks.summary:
        print(f"  {line}")
    if ok:
        log(f"{args.mode} mode passed in {elapsed:.0f} s")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"{args.mode} mode failed after {elapsed:.0f} s; logs kept in {workdir}")
        if world is not None:
            print(f"--- last lines of {world.synapse.log_path}")
            print(tail(world.synapse.log_path, 20))
            fedsend_log = os.path.join(workdir, "fedsend", "fedsend.log")
            if os.path.exists(fedsend_log):
                print(f"--- last lines of {fedsend_log}")
                print(tail(fedsend_log, 20))
    print(f"interop: {checks.passed} passed, {0 if ok else 1} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
