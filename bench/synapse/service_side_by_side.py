#!/usr/bin/env python3
"""The service end to end beside Synapse's sender with request signing on, one table.

Runs `fedsend-service-bench` (`fedsend serve` delivering a burst of N events in one room to D
loopback HTTPS remotes that verify every X-Matrix signature; SQLite, TLS, the ingest API) and
then synapse_sender.py --sign (the pinned Synapse's FederationSender on the same N x D, every
request signed with Synapse's own build_auth_headers, no network and no database), and prints
one table (BENCHMARKS.md, "Service end to end").

    tools/python/synapse-venv/bin/python bench/synapse/service_side_by_side.py
        [--events N] [--remotes D] [--synapse-runs R] [--service-bench PATH] [--check]

--check fails unless both sides delivered every (event, destination) pair, fedsend each one
exactly once with every signature verified. No timing is judged.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"service_side_by_side: {os.path.basename(cmd[0])} failed (exit {done.returncode})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--remotes", type=int, default=1000)
    parser.add_argument("--synapse-runs", type=int, default=1, help="measured runs after one warm-up; the median is shown")
    parser.add_argument(
        "--service-bench",
        default=os.environ.get("FEDSEND_SERVICE_BENCH", os.path.join(ROOT, "target/release/fedsend-service-bench")),
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fedsend_json, synapse_json = os.path.join(tmp, "fedsend.json"), os.path.join(tmp, "synapse.json")
        fedsend_cmd = [args.service_bench, "--events", str(args.events), "--remotes", str(args.remotes), "--json", fedsend_json]
        run(fedsend_cmd + (["--check"] if args.check else []))
        run([
            sys.executable, os.path.join(HERE, "synapse_sender.py"),
            "--events", str(args.events), "--destinations", str(args.remotes),
            "--runs", str(args.synapse_runs), "--warmup", "1", "--sign", "--json", synapse_json,
        ])
        with open(fedsend_json) as f:
            fedsend = json.load(f)
        with open(synapse_json) as f:
            synapse = json.load(f)

    runs = sorted(synapse["runs"], key=lambda r: r["cpu_ns"])
    s = runs[len(runs) // 2]
    pairs = args.events * args.remotes
    failures = []
    if s["pairs"] != pairs or s["incomplete"]:
        failures.append(f"Synapse delivered {s['pairs']} of {pairs} pairs, {s['incomplete']} destinations incomplete")
    if not fedsend["all_delivered"] or fedsend["incomplete_remotes"] or fedsend["remotes_with_repeats"] \
            or fedsend["bad_signatures"] or fedsend["refused"]:
        failures.append(f"fedsend did not deliver every pair exactly once: {fedsend}")

    rows = [
        {
            "sender": f"Synapse {synapse['synapse_version']} sender, signing on (no TLS, no HTTP, no database)",
            "txns": s["txns"],
            "wall_ms": s["wall_ns"] / 1e6,
            "cpu_ms": s["cpu_ns"] / 1e6,
            "memory": f"{synapse['peak_rss_bytes'] / 2**20:.0f} MiB RSS",
        },
        {
            "sender": f"fedsend serve ({fedsend['engine']}): SQLite, HTTPS, X-Matrix, ingest API",
            "txns": fedsend["transactions"],
            "wall_ms": fedsend["wall_ms"],
            "cpu_ms": fedsend["service_cpu_ms"],
            "memory": f"{fedsend['service_peak_rss_bytes'] / 2**20:.0f} MiB RSS",
        },
    ]
    print(f"\n{args.events} events x {args.remotes} remotes = {pairs:,} deliveries\n")
    print("| sender | deliveries | transactions | wall | deliveries/s | transactions/s | CPU | CPU per transaction "
          "| CPU per delivery | deliveries per CPU second | vs Synapse (CPU per delivery) | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    synapse_per_delivery = rows[0]["cpu_ms"] / pairs
    for r in rows:
        # CPU time comes in 10 ms ticks on fedsend's side: a tiny run may read 0.
        cpu_ms = max(r["cpu_ms"], 1e-6)
        per_delivery = cpu_ms / pairs
        print(
            f"| {r['sender']} | {pairs:,} | {r['txns']:,} | {r['wall_ms']:,.0f} ms | {pairs / r['wall_ms'] * 1e3:,.0f} "
            f"| {r['txns'] / r['wall_ms'] * 1e3:,.0f} | {r['cpu_ms']:,.0f} ms | {cpu_ms * 1e3 / r['txns']:,.0f} µs "
            f"| {per_delivery * 1e3:.2f} µs | {pairs / cpu_ms * 1e3:,.0f} | {synapse_per_delivery / per_delivery:.1f}× "
            f"| {r['memory']} |"
        )
    print(
        f"\nfedsend: ingest API acknowledged all events after {fedsend['ingest_ms']:,.0f} ms; service CPU "
        f"{fedsend['service_user_ms']} ms user + {fedsend['service_system_ms']} ms system; the bench process "
        f"(remotes verifying every signature, their TLS, the clients) used {fedsend['bench_process_cpu_ms']:,} ms CPU"
    )
    if args.check and failures:
        sys.exit("service_side_by_side: " + "; ".join(failures))


if __name__ == "__main__":
    main()
