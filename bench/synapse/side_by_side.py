#!/usr/bin/env python3
"""fedsend and Synapse's own federation sender on the same Synapse-shaped burst, one table.

Runs `fedsend-bench --workloads WS` (N events in one room shared with D servers, all handed in
at once, every transaction answered at the next turn) and then synapse_sender.py (the pinned
Synapse's FederationSender on the same N x D, in its own process), checks that both delivered
every (event, destination) pair once and in order, and prints the throughput ratio.

    bench/synapse/side_by_side.sh [--events N] [--destinations D] [--runs R] [--warmup W]
                                  [--engines typed,native,wasm,node] [--bench PATH] [--check]

--check also compares the transactions themselves (each side's transactions written out and
read back; use it at small sizes): the same PDUs per destination, at most 50 per transaction,
canonical JSON bodies with the same keys, each PDU's JSON identical on both sides apart from
the `"unsigned":{}` Synapse adds. Exits non-zero if any check fails.

Transactions per destination differ on purpose, and the check states by how much: Synapse's
per-destination loop starts when the first event is queued and sends it alone, before the rest
of the burst has been handed over, then 50 PDUs at a time: 1 + ceil((N-1)/50). fedsend fans
out each fetched batch of events (100) before it builds transactions, so it may use fewer:
never fewer than ceil(N/50), never more than Synapse.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

from canonicaljson import encode_canonical_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PDUS_PER_TRANSACTION_MAX = 50


def fedsend(args, tmp):
    out = os.path.join(tmp, "fedsend.json")
    cmd = [
        args.bench,
        "--workloads", "WS",
        "--engines", args.engines,
        "--ws-events", str(args.events),
        "--ws-destinations", str(args.destinations),
        "--runs", str(args.runs),
        "--warmup", str(args.warmup),
        "--no-probes",
        "--check",
        "--json", out,
    ]
    if args.check:
        cmd += ["--transcript", os.path.join(tmp, "fedsend.jsonl")]
    print("$ " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"side_by_side: fedsend-bench failed (exit {done.returncode})")
    with open(out) as f:
        return json.load(f)


def synapse(args, tmp):
    out = os.path.join(tmp, "synapse.json")
    cmd = [
        sys.executable,
        os.path.join(HERE, "synapse_sender.py"),
        "--events", str(args.events),
        "--destinations", str(args.destinations),
        "--runs", str(args.runs),
        "--warmup", str(args.warmup),
        "--json", out,
    ]
    if args.check:
        cmd += ["--transcript", os.path.join(tmp, "synapse.jsonl")]
    print("$ " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"side_by_side: synapse_sender.py failed (exit {done.returncode})")
    with open(out) as f:
        return json.load(f)


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def si(x):
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def mib(n):
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.2f} MiB"


def counts_problems(name, r, events, destinations):
    """What both sides must satisfy on their own."""
    problems = []
    pairs = events * destinations
    if r["pairs"] != pairs:
        problems.append(f"{name}: {r['pairs']} (event, destination) pairs delivered, expected {pairs}")
    if r["incomplete"] != 0:
        problems.append(f"{name}: {r['incomplete']} destinations missed an event or got one out of order")
    return problems


def transactions_problems(synapse_r, fedsend_r, events):
    """The documented difference in transactions per destination (module docstring)."""
    problems = []
    synapse_expected = 1 + -(-(events - 1) // PDUS_PER_TRANSACTION_MAX)
    fewest = -(-events // PDUS_PER_TRANSACTION_MAX)
    s_min, s_max = synapse_r["txns_per_destination_min"], synapse_r["txns_per_destination_max"]
    if (s_min, s_max) != (synapse_expected, synapse_expected):
        problems.append(
            f"Synapse sent {s_min}-{s_max} transactions per destination, expected 1 + ceil((N-1)/50) = {synapse_expected}"
        )
    f_min, f_max = fedsend_r["txns_per_destination_min"], fedsend_r["txns_per_destination_max"]
    if f_min < fewest or f_max > s_max:
        problems.append(
            f"fedsend sent {f_min}-{f_max} transactions per destination, expected between ceil(N/50) = {fewest} "
            f"and Synapse's {s_max}"
        )
    return problems


def read_transcript(path, depths_of):
    """destination -> list of transactions, each (PDU depths, parsed body, raw body)."""
    by_destination = defaultdict(list)
    with open(path) as f:
        for line in f:
            t = json.loads(line)
            body = json.loads(t["body"])
            by_destination[t["destination"]].append((depths_of(t), body, t["body"]))
    return by_destination


def fedsend_depths(t):
    return [int(i.removeprefix("$ev")) for i in t["pdu_ids"]]


def transcript_problems(tmp, events, destinations):
    """--check: compares the transactions of the last Synapse run and a fedsend WS run."""
    problems = []
    sides = {
        "fedsend": read_transcript(os.path.join(tmp, "fedsend.jsonl"), fedsend_depths),
        "Synapse": read_transcript(os.path.join(tmp, "synapse.jsonl"), lambda t: t["stream_orderings"]),
    }
    pdu_text = {}  # (side, destination, depth) -> canonical JSON of the PDU as sent
    for side, by_destination in sides.items():
        if sorted(by_destination) != sorted(f"d{i}.test" for i in range(destinations)):
            problems.append(f"{side}: transactions went to {len(by_destination)} destinations, not the {destinations} of the room")
        for d, txns in by_destination.items():
            sent = [k for depths, _, _ in txns for k in depths]
            if sent != list(range(1, events + 1)):
                problems.append(f"{side} -> {d}: PDUs {sent[:5]}... are not events 1..{events} once each, in order")
            for depths, body, raw in txns:
                if len(depths) > PDUS_PER_TRANSACTION_MAX:
                    problems.append(f"{side} -> {d}: {len(depths)} PDUs in one transaction")
                if encode_canonical_json(body).decode() != raw:
                    problems.append(f"{side} -> {d}: the body is not canonical JSON")
                if set(body) != {"origin", "origin_server_ts", "pdus"} or body["origin"] != "origin.test":
                    problems.append(f"{side} -> {d}: unexpected top level {sorted(body)} / origin {body.get('origin')}")
                if [p["depth"] for p in body["pdus"]] != depths:
                    problems.append(f"{side} -> {d}: the PDUs in the body are not the ones reported")
                for k, p in zip(depths, body["pdus"]):
                    if side == "Synapse":
                        # Synapse serialises every PDU with its (here empty) unsigned section.
                        if p.pop("unsigned", None) != {}:
                            problems.append(f"Synapse -> {d}: PDU {k} without an empty unsigned")
                    pdu_text[(side, d, k)] = encode_canonical_json(p)
    differing = sum(
        1
        for (side, d, k), text in pdu_text.items()
        if side == "fedsend" and pdu_text.get(("Synapse", d, k)) != text
    )
    if differing:
        problems.append(f"{differing} (event, destination) PDUs differ between fedsend's and Synapse's bodies")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--engines", default="typed,native,wasm,node", help="fedsend-bench engines")
    parser.add_argument(
        "--bench",
        default=os.environ.get("FEDSEND_BENCH", os.path.join(ROOT, "target", "release", "fedsend-bench")),
        help="the fedsend-bench executable (default: $FEDSEND_BENCH or target/release/fedsend-bench)",
    )
    parser.add_argument("--check", action="store_true", help="also compare the transactions (small sizes)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedsend-side-by-side.") as tmp:
        f = fedsend(args, tmp)
        s = synapse(args, tmp)
        problems = []
        s_runs = s["runs"]
        s_result = {key: median(s_runs, key) for key in s_runs[0]}
        problems += counts_problems("Synapse", s_result, args.events, args.destinations)
        for cell in f["cells"]:
            problems += counts_problems(f"fedsend {cell['engine']}", cell["result"], args.events, args.destinations)
            problems += transactions_problems(s_result, cell["result"], args.events)
        if args.check:
            problems += transcript_problems(tmp, args.events, args.destinations)

    n, d = args.events, args.destinations
    print(f"Synapse-shaped burst: {n} events in one room shared with {d} servers, all handed in at once, "
          f"every transaction answered at the next turn; medians of {args.runs} runs after {args.warmup} warm-up")
    print(f"fedsend: {f['machine']}")
    print(f"Synapse: matrix-synapse {s['synapse_version']}, Python {s['python']}")
    print()
    print("| sender | deliveries | transactions | per destination | sender time | deliveries/s | whole run CPU | whole run wall | peak memory | vs Synapse, sender time | vs Synapse, whole run CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    s_cpu = s_result["cpu_ns"]

    def row(name, r, sender_ns, memory):
        low, high = r["txns_per_destination_min"], r["txns_per_destination_max"]
        per = f"{low}" if low == high else f"{low}–{high}"
        print(
            f"| {name} | {r['pairs']:,} | {r['txns']:,} | {per} | {sender_ns / 1e6:,.0f} ms | "
            f"{si(r['pairs'] * 1e9 / max(sender_ns, 1))} | {r['cpu_ns'] / 1e6:,.0f} ms | {r['wall_ns'] / 1e6:,.0f} ms | "
            f"{memory} | {s_cpu / max(sender_ns, 1):.1f}× | {s_cpu / max(r['cpu_ns'], 1):.1f}× |"
        )

    row(f"Synapse {s['synapse_version']}", s_result, s_cpu, f"{mib(s['peak_rss_bytes'])} RSS")
    for cell in f["cells"]:
        r = cell["result"]
        row(f"fedsend, {cell['engine']}", r, r["core_ns"], f"{mib(r['peak_memory'])} core")
    print()
    print(f"fedsend-bench process peak RSS (every engine above, host included): {mib(f['peak_rss_bytes'])}")
    print("sender time: Synapse = CPU time of the run (time.process_time: the sender, Twisted, the in-memory store,")
    print("  the fake HTTP client's canonical JSON); fedsend = core time (handle_input and draining its outputs).")
    print("whole run CPU: the run's CPU time on each side, fedsend's bench host (JSON in and out, in-memory store)")
    print("  included; time the machine gave to other processes is not counted. Wall time includes it.")
    if problems:
        for p in problems:
            print(f"check FAILED: {p}")
        sys.exit(1)
    print("check: both sides delivered every (event, destination) pair once and in order; transactions per "
          "destination as documented" + ("; bodies agree PDU for PDU" if args.check else ""))


if __name__ == "__main__":
    main()
