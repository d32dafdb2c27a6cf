#!/usr/bin/env python3
"""Synapse's own federation-sender worker and `fedsend synapse` on one deployment, one table.

One run sets up one Synapse deployment (interop/worker/deployment.py): hs1's main process on
PostgreSQL + Redis with one federation sender instance, `fedsend1`. Each burst has R remotes and K
public rooms of hs1 of its own (loopback_remotes.py: one child process serving every server name
`127.0.0.1:PORT` over HTTPS, answering every `/send` at once); the remotes join their rooms
through make_join/send_join, as servers joining over federation do, so hs1's database holds them
as any joined server. Then, for each sender in turn (the other one stopped), a fresh process of
that sender is started as `fedsend1` and @alice sends E events to the burst's rooms through hs1's
client API as fast as hs1 takes them (C concurrent clients, event i in room i mod K): they reach
the sender only through Synapse's own persistence and its replication on Redis. Fresh remotes per
burst keep the bursts independent: no destination has history from the other sender (why:
`Bench.setup`).

Measured for the sender process alone (from /proc/PID): CPU seconds (user + system, from just
before the burst until the remotes went quiet after it), peak RSS (VmHWM; every burst has a new
process) and the drain time: from the first event sent to the moment the last (event, remote)
pair reached a remote. Checked: every remote received every event of the burst exactly once
(transactions are deduplicated by id as a receiving server does; a PDU seen twice is a failure),
and the sender's `events` position in `federation_stream_position` caught up before it is
stopped, so the next sender starts where it ended and resends nothing.

    tools/python/synapse-venv/bin/python bench/synapse/worker_side_by_side.py
        [--events E] [--remotes R] [--rooms K] [--clients C] [--runs N] [--senders python,fedsend]
        [--fedsend target/release/fedsend] [--services-env FILE | --private-services]
        [--workdir DIR] [--keep] [--json FILE] [--perf FILE] [--check]

`--runs N` repeats the pair of bursts N times in the same deployment and rooms, alternating which
sender goes first, and the table shows each sender's medians. `--check` is for tiny sizes
(scripts/test.sh, stage bench: `--events 20 --remotes 5`): counts only, no timing judged. The exit
status is 1 whenever a sender did not deliver every pair exactly once, in either mode.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (os.path.join(ROOT, "interop"), os.path.join(ROOT, "interop", "worker")):
    if p not in sys.path:
        sys.path.insert(0, p)

import requests  # noqa: E402

from deployment import MainProcess, SenderInstance, Services  # noqa: E402
from harness import HarnessError, Origin, free_port, now_ms, wait_until  # noqa: E402

INSTANCE = "fedsend1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FARM_START_TIMEOUT_S = 30
FARM_STOP_TIMEOUT_S = 10
QUIET_S = 2.0  # no request reached any remote for this long: the sender has nothing more to send
QUIET_TIMEOUT_S = 60
CAUGHT_UP_TIMEOUT_S = 60
BOOKKEEPING_TIMEOUT_S = 30
CLIENT_TIMEOUT_S = 60
JOIN_THREADS = 4
# Bounded by the size of the burst: 2 000 x 100 drains in well under a minute on 2 cores.
DRAIN_TIMEOUT_MIN_S = 120
DRAIN_TIMEOUT_PER_PAIR_S = 0.005
STALL_S = 20


def say(msg):
    print(f"worker_side_by_side: {msg}", flush=True)


class BenchError(Exception):
    pass


# -- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid):
    """(user, system) seconds of process `pid`, all its threads (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def status_bytes(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {key} in /proc/{pid}/status")


def metric_samples(text, name):
    """{labels: value} of one Prometheus metric in exposition text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            try:
                out[key[len(name):]] = float(value)
            except ValueError:
                pass
    return out


def synapse_db_split(before, after, top=8):
    """Synapse's database transactions during the burst, by name: [(desc, count, seconds)],
    the most time first, from its `synapse_storage_transaction_time_*_total` counters; and the
    SQL statements it ran, by verb."""
    split = []
    counts_before = metric_samples(before, "synapse_storage_transaction_time_count_total")
    sums_before = metric_samples(before, "synapse_storage_transaction_time_sum_total")
    sums_after = metric_samples(after, "synapse_storage_transaction_time_sum_total")
    for labels, count in metric_samples(after, "synapse_storage_transaction_time_count_total").items():
        n = count - counts_before.get(labels, 0)
        if n > 0:
            desc = labels.partition('desc="')[2].partition('"')[0] or labels
            split.append((desc, int(n), sums_after.get(labels, 0) - sums_before.get(labels, 0)))
    split.sort(key=lambda x: -x[2])
    verbs = {}
    queries_before = metric_samples(before, "synapse_storage_query_time_count")
    for labels, count in metric_samples(after, "synapse_storage_query_time_count").items():
        verb = labels.partition('verb="')[2].partition('"')[0]
        verbs[verb] = verbs.get(verb, 0) + int(count - queries_before.get(labels, 0))
    return split[:top], sum(x[1] for x in split), sum(x[2] for x in split), verbs


# -- the remotes ---------------------------------------------------------------------------


class Remotes:
    """The loopback_remotes.py child: R servers (each an `interop/harness.Origin` for joining)."""

    def __init__(self, workdir, count, python):
        self.workdir = os.path.join(workdir, "remotes")
        os.makedirs(self.workdir, exist_ok=True)
        # Each Origin picks a free port and writes its signing key and certificate; the child
        # serves them, the Origin objects make the join requests to hs1 with the same keys.
        self.origins = []
        ports = set()
        for i in range(count):
            # The kernel may hand out a port it just gave: each remote needs its own.
            port = wait_until(lambda: (lambda p: p not in ports and p)(free_port()), 10, "a free port", interval_s=0)
            ports.add(port)
            self.origins.append(Origin(os.path.join(self.workdir, f"r{i}"), port=port))
        spec = [
            {
                "port": o.port,
                "signing_key_path": o.signing_key_path,
                "cert_path": o.cert_path,
                "cert_key_path": o.cert_key_path,
            }
            for o in self.origins
        ]
        spec_path = os.path.join(self.workdir, "remotes.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        ready = os.path.join(self.workdir, "ready.json")
        self.log_path = os.path.join(self.workdir, "remotes.log")
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "loopback_remotes.py"), "--remotes", spec_path, "--ready", ready,
             "--transcript", os.path.join(self.workdir, "transactions.txt")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()

        def up():
            if self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise BenchError(f"loopback_remotes.py exited with {self.proc.returncode}: {f.read()[-2000:]}")
            return os.path.exists(ready)

        wait_until(up, FARM_START_TIMEOUT_S, "the loopback remotes to listen", interval_s=0.05)
        with open(ready) as f:
            self.control = f"http://127.0.0.1:{json.load(f)['control_port']}"

    def stats(self):
        return requests.get(self.control + "/_bench/stats", timeout=30).json()

    def missing(self, group, expect):
        return requests.get(self.control + "/_bench/missing", params={"group": group, "expect": expect}, timeout=60).json()

    def set_phase(self, name):
        requests.post(self.control + "/_bench/phase", params={"name": name}, timeout=10).raise_for_status()

    def wait_quiet(self, quiet_s=QUIET_S, timeout_s=QUIET_TIMEOUT_S):
        """Until no request has reached any remote for `quiet_s`."""

        def quiet():
            s = self.stats()
            return time.monotonic() - max(s["last_request"], 0.0) >= quiet_s

        wait_until(quiet, timeout_s, f"the remotes to get no request for {quiet_s} s", interval_s=0.25)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(FARM_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the deployment ------------------------------------------------------------------------


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.services = None
        self.hs1 = None
        self.remotes = None
        self.sender = None

    def setup(self, bursts):
        a = self.args
        t0 = time.monotonic()
        self.services = Services(self.workdir, a.services_env, private=a.private_services)
        dbname = f"fedsend_wbench_{os.getpid()}_{now_ms() % 10**8}"
        self.services.create_database(dbname)
        self.hs1 = MainProcess(os.path.join(self.workdir, "hs1"), self.services, dbname, [INSTANCE], python=sys.executable)
        self.hs1.start()
        # Every burst gets remotes and rooms of its own (`cohort`).
        self.remotes = Remotes(self.workdir, a.remotes * bursts, sys.executable)
        self.hs1.register("alice", "alice-password")
        self.alice = self.hs1.login("alice", "alice-password", "ALICEDEV")
        self.token = self.alice.session.headers["Authorization"]
        say(f"deployment up in {time.monotonic() - t0:.1f} s: hs1 {self.hs1.server_name}, {a.remotes * bursts} remotes")

    def cohort(self, b):
        """Burst b's K rooms, with its R remotes joined, made while no sender runs.

        A destination must be new to the sender under test. One that a sender has sent PDUs to
        has history (`destinations.last_successful_stream_ordering`, `destination_rooms`), and a
        sender that finds it behind starts it in catch-up, where both senders send only the
        latest event of each room and leave the rest for the remote to fetch
        (get_missing_events, which these remotes do not do); Synapse's worker can also leave its
        last positions unwritten when it is stopped under load. Joining only now keeps the
        earlier senders from sending anything to these remotes (the joins are relayed to the
        room's other servers, and hs1 adds dummy events to merge the forward extremities)."""
        a = self.args
        t0 = time.monotonic()
        rooms = [self.alice.create_room(f"worker bench {b}.{k}") for k in range(a.rooms)]
        origins = self.remotes.origins[b * a.remotes:(b + 1) * a.remotes]

        def join_all(origin):
            for room_id in rooms:
                origin.join(self.hs1, room_id, "wb")

        with concurrent.futures.ThreadPoolExecutor(JOIN_THREADS) as pool:
            list(pool.map(join_all, origins))
        joined = dict(
            self.hs1.query(
                "SELECT room_id, count(*) FROM current_state_events "
                "WHERE type = 'm.room.member' AND membership = 'join' AND room_id = ANY(%s) GROUP BY room_id",
                (rooms,),
            )
        )
        for room_id in rooms:
            if joined.get(room_id) != a.remotes + 1:
                raise BenchError(
                    f"{room_id} has {joined.get(room_id)} joined members in hs1's database, expected {a.remotes + 1}"
                )
        say(f"burst {b + 1}: {a.remotes} new remotes joined to {a.rooms} new rooms in {time.monotonic() - t0:.1f} s")
        return {"rooms": rooms, "ports": {str(o.port) for o in origins}}

    def max_stream_ordering(self):
        return self.hs1.query("SELECT coalesce(max(stream_ordering), 0) FROM events")[0][0]

    def sender_position(self):
        rows = self.hs1.query(
            "SELECT stream_id FROM federation_stream_position WHERE type = 'events' AND instance_name = %s", (INSTANCE,)
        )
        return rows[0][0] if rows else None

    def send_burst(self, group, rooms, count):
        """`count` events from @alice through the client API; returns (t_first_sent, t_all_answered)."""
        a = self.args
        indexes = iter(range(count))
        lock = threading.Lock()
        errors = []

        def client():
            s = requests.Session()
            s.headers["Authorization"] = self.token
            while not errors:
                with lock:
                    i = next(indexes, None)
                if i is None:
                    return
                room = urllib.parse.quote(rooms[i % len(rooms)])
                url = f"{self.hs1.client_url}/_matrix/client/v3/rooms/{room}/send/m.room.message/{group}-{i}"
                try:
                    r = s.put(url, json={"msgtype": "m.text", "body": f"{group}-{i}"}, timeout=CLIENT_TIMEOUT_S)
                    if r.status_code != 200:
                        errors.append(f"event {i}: {r.status_code} {r.text[:200]}")
                except requests.RequestException as e:
                    errors.append(f"event {i}: {e}")

        threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(min(a.clients, count))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"hs1 refused {len(errors)} events, first: {errors[0]}")
        return t0, time.monotonic()

    def scrape(self, inst):
        """The sender's Prometheus text (Synapse's worker: its metrics listener; fedsend: /metrics)."""
        path = "/_synapse/metrics" if inst.kind == "python" else "/metrics"
        try:
            return requests.get(f"http://127.0.0.1:{inst.listen_port}{path}", timeout=10).text
        except requests.RequestException as e:
            return f"# could not scrape: {e}\n"

    def wait_delivered(self, group, count, cohort, inst, timeout_s):
        """Until every remote of `cohort` has `count` events of `group`, the sender has stalled
        (its position past every event and nothing new for STALL_S) or exited, or the timeout.
        Returns whether everything arrived."""
        deadline = time.monotonic() + timeout_s
        progress, progress_at = -1, time.monotonic()
        while time.monotonic() < deadline:
            stats = self.remotes.stats()
            counts = [r["groups"].get(group, {}).get("distinct", 0)
                      for port, r in stats["remotes"].items() if port in cohort["ports"]]
            if all(n >= count for n in counts):
                return True
            if inst.proc.poll() is not None:
                return False
            if sum(counts) != progress:
                progress, progress_at = sum(counts), time.monotonic()
            elif time.monotonic() - progress_at > STALL_S and \
                    (self.sender_position() or 0) >= self.max_stream_ordering():
                # The sender's position is past every event and nothing has arrived for a
                # while: what is missing will not come.
                say(f"{group}: stalled at {progress:,} pairs with the sender's position past the last event")
                return False
            time.sleep(0.2)
        return False

    def phase(self, kind, run, cohort):
        """One burst through a fresh `kind` sender process, to `cohort`'s remotes and rooms;
        returns its measurements."""
        a = self.args

        def mine(stats):
            return [r for port, r in stats["remotes"].items() if port in cohort["ports"]]

        group = f"wb{run}-{kind}"
        inst = SenderInstance(self.hs1, INSTANCE, kind, fedsend_bin=a.fedsend)
        self.sender = inst
        inst.start()
        pid = inst.proc.pid
        try:
            self.remotes.set_phase(f"{group}-start")
            # One event first, delivered everywhere before the burst: Synapse's worker sends what
            # it owes these remotes (the relayed joins, hs1's dummy events) only when a new event
            # arrives, fedsend at start; and both open their connections to the remotes. The
            # burst then measures the steady path of both.
            self.send_burst(f"{group}-warmup", cohort["rooms"][:1], 1)
            if not self.wait_delivered(f"{group}-warmup", 1, cohort, inst, DRAIN_TIMEOUT_MIN_S):
                raise BenchError(f"the {kind} sender did not deliver the warm-up event to every remote")
            self.remotes.wait_quiet()
            before_start = self.remotes.stats()
            rss_before = status_bytes(pid, "VmRSS")
            metrics_before = self.scrape(inst)
            self.remotes.set_phase(group)
            perf = None
            if a.perf and kind == "fedsend":
                perf = subprocess.Popen(
                    ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid), "-o", a.perf],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
            cpu0, main0, farm0 = cpu_seconds(pid), cpu_seconds(self.hs1.proc.pid), cpu_seconds(self.remotes.proc.pid)
            t0, t_sent = self.send_burst(group, cohort["rooms"], a.events)
            say(f"run {run} {kind}: {a.events} events accepted by hs1 in {t_sent - t0:.1f} s")

            expect = a.events
            deadline = time.monotonic() + max(DRAIN_TIMEOUT_MIN_S, DRAIN_TIMEOUT_PER_PAIR_S * a.events * a.remotes)
            drained = self.wait_delivered(
                group, expect, cohort, inst,
                max(DRAIN_TIMEOUT_MIN_S, DRAIN_TIMEOUT_PER_PAIR_S * a.events * a.remotes),
            )
            # Positions: the next sender must start after this burst, not inside it.
            target = self.max_stream_ordering()
            caught_up = False
            try:
                wait_until(lambda: (self.sender_position() or 0) >= target, CAUGHT_UP_TIMEOUT_S,
                           f"{INSTANCE}'s events position to reach {target}", interval_s=0.25)
                caught_up = True
            except HarnessError:
                pass
            # And each destination's `last_successful_stream_ordering` (an observation, not a
            # check): a destination left behind it is caught up by the next sender, which sends
            # each room's latest event again. Synapse's worker writes it after each transaction
            # through a pool of 5 connections; in the full-size runs so far its writes were still
            # behind the burst's last event 30 s after the drain (they got there later).
            last = self.hs1.query("SELECT max(stream_ordering) FROM events WHERE room_id = ANY(%s)", (cohort["rooms"],))[0][0]
            names = [f"127.0.0.1:{port}" for port in cohort["ports"]]

            def destinations_behind():
                return self.hs1.query(
                    "SELECT count(*) FROM destinations WHERE destination = ANY(%s) "
                    "AND coalesce(last_successful_stream_ordering, 0) >= %s", (names, last),
                )[0][0] < len(names)

            t_book = time.monotonic()
            try:
                wait_until(lambda: not destinations_behind(), BOOKKEEPING_TIMEOUT_S,
                           "the destinations' last_successful_stream_ordering to reach the burst's last event",
                           interval_s=0.25)
                bookkeeping = time.monotonic() - t_book
            except HarnessError:
                bookkeeping = None
            behind = self.hs1.query(
                "SELECT count(*) FROM destinations WHERE destination = ANY(%s) "
                "AND coalesce(last_successful_stream_ordering, 0) < %s", (names, last),
            )[0][0]
            if inst.proc.poll() is None:
                try:
                    self.remotes.wait_quiet()
                except HarnessError:
                    pass
            if perf:
                perf.send_signal(signal.SIGINT)
                try:
                    perf.wait(60)
                except subprocess.TimeoutExpired:
                    perf.kill()
                    perf.wait()
            alive = inst.proc.poll() is None
            if not alive:
                raise BenchError(f"the {kind} sender exited with {inst.proc.returncode} during the burst (log in {inst.stdout_path})")
            cpu1, main1, farm1 = cpu_seconds(pid), cpu_seconds(self.hs1.proc.pid), cpu_seconds(self.remotes.proc.pid)
            hwm = status_bytes(pid, "VmHWM")
            metrics_after = self.scrape(inst)
            stats = self.remotes.stats()
        finally:
            inst.stop()
            self.sender = None

        with open(os.path.join(self.workdir, f"metrics.{group}.before.txt"), "w") as f:
            f.write(metrics_before)
        with open(os.path.join(self.workdir, f"metrics.{group}.after.txt"), "w") as f:
            f.write(metrics_after)
        per_remote = [r["groups"].get(group, {"distinct": 0, "duplicates": 0, "txns": 0, "last_new": 0.0})
                      for r in mine(stats)]
        phases = [r["phases"].get(group, {}) for r in mine(stats)]
        start_phase = [r["phases"].get(f"{group}-start", {}) for r in before_start["remotes"].values()]
        delivered = sum(min(g["distinct"], expect) for g in per_remote)
        t_last = max(g["last_new"] for g in per_remote)
        missing = {} if drained else {
            port: m for port, m in self.remotes.missing(group, expect).items() if port in cohort["ports"]
        }
        result = {
            "sender": kind,
            "run": run,
            "events": a.events,
            "remotes": a.remotes,
            "rooms": a.rooms,
            "pairs_expected": a.events * a.remotes,
            "pairs_delivered": delivered,
            "duplicate_pdus": sum(g["duplicates"] for g in per_remote),
            "remotes_incomplete": sum(1 for g in per_remote if g["distinct"] < expect),
            "missing": missing,
            "drained": drained,
            "caught_up": caught_up,
            "bookkeeping_s": bookkeeping,
            "destinations_behind": behind,
            "burst_transactions": sum(g["txns"] for g in per_remote),
            "transactions": sum(p.get("txns", 0) for p in phases),
            "transactions_to_other_remotes": sum(
                r["phases"].get(group, {}).get("txns", 0) for port, r in stats["remotes"].items()
                if port not in cohort["ports"]
            ),
            "repeated_transactions": sum(p.get("repeated_txns", 0) for p in phases),
            "edus": sum(p.get("edus", 0) for p in phases),
            "startup_transactions": sum(p.get("txns", 0) for p in start_phase),
            "cpu_user_s": cpu1[0] - cpu0[0],
            "cpu_system_s": cpu1[1] - cpu0[1],
            "cpu_s": sum(cpu1) - sum(cpu0),
            "peak_rss_bytes": hwm,
            "rss_before_bytes": rss_before,
            "send_s": t_sent - t0,
            "drain_s": (t_last - t0) if t_last else None,
            "tail_s": (t_last - t_sent) if t_last else None,
            "hs1_main_cpu_s": sum(main1) - sum(main0),
            "remotes_cpu_s": sum(farm1) - sum(farm0),
            "remote_errors": stats["errors"],
        }
        if kind == "python":
            top, n, secs, verbs = synapse_db_split(metrics_before, metrics_after)
            result["db_transactions"] = n
            result["db_seconds"] = secs
            result["db_top"] = top
            result["db_statements"] = verbs
        ok = drained and result["duplicate_pdus"] == 0 and caught_up and not stats["errors"]
        say(
            f"run {run} {kind}: {'drained' if drained else 'NOT drained'} "
            f"{delivered:,}/{result['pairs_expected']:,} pairs in {result['drain_s'] or 0:.1f} s, "
            f"{result['duplicate_pdus']} duplicates, {result['burst_transactions']:,} transactions, "
            f"CPU {result['cpu_s']:.2f} s, peak RSS {hwm / 2**20:.0f} MiB, destinations' positions written "
            + (f"{bookkeeping:.1f} s after the drain" if bookkeeping is not None
               else f"not in {BOOKKEEPING_TIMEOUT_S} s: {behind} of {len(names)} destinations behind the burst's last event")
            + ("" if ok else " (FAILED)")
        )
        return result

    def close(self):
        for stop in (
            lambda: self.sender and self.sender.stop(),
            lambda: self.remotes and self.remotes.stop(),
            lambda: self.hs1 and self.hs1.stop(),
            lambda: self.services and self.services.close(),
        ):
            try:
                stop()
            except Exception as e:  # noqa: BLE001 (cleanup goes on)
                say(f"cleanup: {type(e).__name__}: {e}")


# -- report --------------------------------------------------------------------------------


def problems_of(r):
    out = []
    name = {"python": "Synapse's worker", "fedsend": "fedsend"}[r["sender"]]
    if r["pairs_delivered"] != r["pairs_expected"]:
        out.append(f"run {r['run']} {name}: {r['pairs_delivered']:,} of {r['pairs_expected']:,} pairs delivered "
                   f"({r['remotes_incomplete']} remotes incomplete; missing: {json.dumps(r['missing'])[:400]})")
    if r["duplicate_pdus"]:
        out.append(f"run {r['run']} {name}: {r['duplicate_pdus']} PDUs delivered more than once")
    if not r["caught_up"]:
        out.append(f"run {r['run']} {name}: its events position in federation_stream_position did not catch up")
    if r["remote_errors"]:
        out.append(f"run {r['run']} {name}: the remotes could not read requests: {r['remote_errors'][:3]}")
    return out


def mib(n):
    return f"{n / 2**20:.0f} MiB"


def table(results, args):
    by = {}
    for r in results:
        by.setdefault(r["sender"], []).append(r)
    label = {
        "python": "Synapse's federation-sender worker (generic_worker)",
        "fedsend": "`fedsend synapse`",
    }
    med = {}
    for kind, rs in by.items():
        m = lambda k: statistics.median(x[k] for x in rs if x[k] is not None)  # noqa: E731
        med[kind] = {k: m(k) for k in ("cpu_s", "cpu_user_s", "cpu_system_s", "peak_rss_bytes", "drain_s", "send_s",
                                       "tail_s", "burst_transactions", "pairs_delivered", "hs1_main_cpu_s",
                                       "remotes_cpu_s", "edus", "rss_before_bytes")}
    pairs = args.events * args.remotes
    runs = len(next(iter(by.values())))
    lines = [
        f"{args.events:,} events x {args.remotes} remotes in {args.rooms} rooms = {pairs:,} (event, remote) pairs; "
        f"median of {runs} run{'s' if runs > 1 else ''}",
        "",
        "| sender | deliveries | transactions | CPU (user + sys) | CPU per delivery | peak RSS | drain time "
        "| hs1 accepted the events in | last delivery after the last event was accepted | hs1 main CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("python", "fedsend"):
        if kind not in med:
            continue
        m = med[kind]
        per = m["cpu_s"] / pairs * 1e6
        lines.append(
            f"| {label[kind]} | {m['pairs_delivered']:,.0f} | {m['burst_transactions']:,.0f} "
            f"| {m['cpu_s']:.2f} s ({m['cpu_user_s']:.2f} + {m['cpu_system_s']:.2f}) | {per:.1f} µs "
            f"| {mib(m['peak_rss_bytes'])} | {m['drain_s']:.1f} s | {m['send_s']:.1f} s | {m['tail_s']:.2f} s "
            f"| {m['hs1_main_cpu_s']:.1f} s |"
        )
    if "python" in med and "fedsend" in med:
        p, f = med["python"], med["fedsend"]
        lines.append("")
        lines.append(
            f"Synapse's worker / fedsend: CPU {p['cpu_s'] / max(f['cpu_s'], 0.01):.1f}x, "
            f"peak RSS {p['peak_rss_bytes'] / f['peak_rss_bytes']:.1f}x, drain time {p['drain_s'] / f['drain_s']:.2f}x"
        )
    for r in by.get("python", [])[-1:]:
        if "db_top" in r:
            lines.append("")
            lines.append(
                f"Synapse's worker, run {r['run']}: {r['db_transactions']:,} database transactions, "
                f"{r['db_seconds']:.2f} s inside them, "
                + ", ".join(f"{n:,} {v}" for v, n in sorted(r["db_statements"].items(), key=lambda x: -x[1]) if n)
                + "; most time: "
                + ", ".join(f"{d} ({n:,}, {t:.2f} s)" for d, n, t in r["db_top"][:6])
            )
    lines.append("")
    lines.append("per run: " + "; ".join(
        f"{r['run']}:{r['sender']} cpu {r['cpu_s']:.2f} s rss {mib(r['peak_rss_bytes'])} drain {r['drain_s'] or 0:.1f} s "
        f"txns {r['burst_transactions']}" for r in results))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--remotes", type=int, default=100)
    parser.add_argument("--rooms", type=int, default=4, help="the events are spread over K rooms, every remote in each")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client-API senders")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--senders", default="python,fedsend")
    parser.add_argument("--fedsend", default=os.path.join(ROOT, "target", "release", "fedsend"))
    parser.add_argument("--services-env", help="PostgreSQL + Redis from a scripts/services.sh env file")
    parser.add_argument("--private-services", action="store_true", help="a private PostgreSQL + Redis even if FEDSEND_TEST_* are set")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one, removed after a pass)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory after a pass")
    parser.add_argument("--json", help="write every run's measurements here")
    parser.add_argument("--perf", help="perf record (cpu-clock, call graphs) of the fedsend process over its bursts, to FILE")
    parser.add_argument("--check", action="store_true", help="tiny sizes: counts only")
    args = parser.parse_args()
    kinds = [k for k in args.senders.split(",") if k]
    if not kinds or any(k not in ("python", "fedsend") for k in kinds):
        parser.error("--senders: a comma-separated list of python and fedsend")
    args.fedsend = os.path.abspath(args.fedsend)  # the instance runs in its scratch directory
    if "fedsend" in kinds and not os.access(args.fedsend, os.X_OK):
        parser.error(f"--fedsend {args.fedsend}: not an executable (cargo build --release -p fedsend-host-native)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own_workdir = not args.workdir
    workdir = args.workdir or tempfile.mkdtemp(prefix="fedsend-wbench-")
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)  # the services' postgres user reaches its data dir inside
    t0 = time.monotonic()
    bench = Bench(args, workdir)
    results, failures = [], []
    try:
        bench.setup(len(kinds) * args.runs)
        bursts = itertools.count()
        for run in range(1, args.runs + 1):
            order = kinds if run % 2 else list(reversed(kinds))
            for kind in order:
                r = bench.phase(kind, run, bench.cohort(next(bursts)))
                results.append(r)
                failures += problems_of(r)
        # A sender that resent an earlier burst (to that burst's remotes) shows only here.
        stats = bench.remotes.stats()
        every = sum(g["duplicates"] for rem in stats["remotes"].values() for g in rem["groups"].values())
        if every != sum(r["duplicate_pdus"] for r in results):
            # Not a failure: the catch-up of destinations an earlier sender left behind (above).
            say(f"observed: {every - sum(r['duplicate_pdus'] for r in results)} PDUs of earlier bursts were sent "
                "again (the next sender catching up destinations left behind)")
    except (BenchError, HarnessError, requests.RequestException, OSError) as e:
        failures.append(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        bench.close()

    if results:
        print()
        print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results}, f, indent=1)
    for p in failures:
        print(f"FAILED: {p}", flush=True)
    if failures:
        say(f"FAILED after {time.monotonic() - t0:.0f} s; scratch directory kept: {workdir}")
        sys.exit(1)
    say(f"every remote received every event of every burst exactly once ({len(results)} bursts) in {time.monotonic() - t0:.0f} s")
    if own_workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.keep:
        say(f"scratch directory kept: {workdir}")


if __name__ == "__main__":
    main()
