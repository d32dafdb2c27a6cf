#!/usr/bin/env python3
"""Synapse's own federation sender on fedsend-bench's Synapse-shaped burst (workload WS).

Runs the FederationSender, PerDestinationQueue and TransactionManager of the pinned
matrix-synapse (tools/python/synapse-venv) with the real TransportLayerClient, and replaces
only what lies outside the sender:

* storage: an in-memory stand-in for the DataStore methods the sender calls (nothing is
  written to a database, so Synapse's figures are an upper bound for a real deployment);
* the federation HTTP client: each PUT builds Synapse's MatrixFederationRequest, consults
  Synapse's retry limiter and encodes the body with encode_canonical_json, as
  MatrixFederationHttpClient does, then answers 200 {"pdus": {}} at the next reactor turn.
  It does not sign the request (fedsend's core does not sign either: its host does) unless
  --sign: then each request also gets its X-Matrix Authorization header from Synapse's own
  MatrixFederationHttpClient.build_auth_headers (signedjson's ed25519 over the canonical JSON
  of the request object), as the real client does before it encodes the body;
* the room state: every event's prev_events have the same D remote hosts joined.

The burst: N events (the PDUs of bench/src/lib.rs `pdu`, room version 10) in one room shared
with D servers, persisted before the run (as Synapse's event cache holds them after
persisting) and handed over with one notify_new_events; the reactor (Twisted's default, epoll)
is iterated until every destination's queue has gone idle.

    python synapse_sender.py --events N --destinations D [--runs 3] [--warmup 1]
        [--sign] [--json FILE] [--transcript FILE]

prints one JSON object: the measured runs (CPU time from time.process_time, wall time,
transactions, (event, destination) deliveries, body bytes, transactions per destination,
destinations that missed an event or got one out of order) and the process's peak RSS.
--transcript FILE writes the last run's transactions as JSON lines (destination, stream
orderings of its PDUs, body), the format `fedsend-bench --transcript` writes.
"""

import argparse
import gc
import importlib.metadata
import json
import platform
import resource
import sys
import time
from types import SimpleNamespace

from canonicaljson import encode_canonical_json
from twisted.internet import defer, reactor

from synapse.api.room_versions import RoomVersions
from synapse.config._base import ShardedWorkerHandlingConfig
from synapse.config.federation import FederationConfig
from synapse.events import make_event_from_dict
from synapse.federation.sender import FederationSender
from synapse.federation.transport.client import TransportLayerClient
from signedjson.key import generate_signing_key

from synapse.http.matrixfederationclient import MatrixFederationHttpClient, MatrixFederationRequest
from synapse.logging.context import make_deferred_yieldable
from synapse.metrics import all_later_gauges_to_clean_up_on_shutdown
from synapse.metrics.background_process_metrics import run_as_background_process
from synapse.module_api.callbacks.federation import FederationModuleApiCallbacks
from synapse.replication.tcp.external_cache import ExternalCache
from synapse.storage.databases.main.events_worker import EventCacheEntry
from synapse.types import RoomStreamToken, get_domain_from_id
from synapse.util.clock import Clock
from synapse.util.retryutils import get_retry_limiter

ORIGIN = "origin.test"
# bench/src/lib.rs T0: virtual time of every workload, used in the PDUs.
T0_MS = 1_700_000_000_000
ROOM_ID = f"!r0:{ORIGIN}"
# Guards against a run that never drains (a harness bug), in seconds of wall time.
RUN_LIMIT_S = 3600


def destination(i):
    """bench/src/lib.rs `destination`."""
    return f"d{i}.test"


def pdu(k, room_id):
    """bench/src/lib.rs `pdu`: the same ~600-byte m.room.message."""
    return {
        "auth_events": [
            "$create-event-id-000000000000000000000000000",
            "$power-levels-event-id-0000000000000000000000",
            "$member-event-id-0000000000000000000000000000",
        ],
        "content": {"body": f"benchmark message number {k}", "msgtype": "m.text"},
        "depth": k,
        "hashes": {"sha256": "ThisIsAFakeContentHashOfFortyThreeCharacter"},
        "origin_server_ts": T0_MS + k,
        "prev_events": [f"$ev{k - 1}"],
        "room_id": room_id,
        "sender": f"@alice:{ORIGIN}",
        "signatures": {
            ORIGIN: {
                "ed25519:a_key": "ThisIsAFakeSignatureOfEightySixCharactersThisIsAFakeSignatureOfEightySixCharactersXX"
            }
        },
        "type": "m.room.message",
    }


def persisted_events(count):
    """The burst as Synapse's event cache would hold it: events 1..count, stream ordering k."""
    events = []
    for k in range(1, count + 1):
        event = make_event_from_dict(pdu(k, ROOM_ID), RoomVersions.V10)
        event.internal_metadata.stream_ordering = k
        # The id is a hash of the event, computed once and kept: persisting did that already.
        assert event.event_id
        events.append(event)
    return events


class BurstStore:
    """The DataStore methods FederationSender and its queues call, over dicts.

    Every method answers at once (no database round trip), so the sender never waits on
    storage; the fan-out of the whole burst therefore runs before the first answer arrives.
    """

    def __init__(self, events):
        self._events = events
        self._by_id = {e.event_id: EventCacheEntry(event=e, redacted_event=None) for e in events}
        self.federation_out_pos = {"events": 0}
        self.destination_rooms = {}
        self.last_successful = {}
        self.retry_timings = {}

    async def get_federation_out_pos(self, stream_type):
        return self.federation_out_pos[stream_type]

    async def update_federation_out_pos(self, stream_type, stream_id):
        self.federation_out_pos[stream_type] = stream_id

    async def get_all_new_event_ids_stream(self, from_id, current_id, limit):
        rows = self._events[from_id : min(current_id, from_id + limit)]
        upper_bound = current_id if len(rows) < limit else rows[-1].internal_metadata.stream_ordering
        return upper_bound, {e.event_id: T0_MS for e in rows}

    async def get_unredacted_events_from_cache_or_db(self, event_ids):
        return {event_id: self._by_id[event_id] for event_id in event_ids}

    async def get_partial_state_servers_at_join(self, room_id):
        return None

    async def store_destination_rooms_entries(self, destinations, room_id, stream_ordering):
        for d in destinations:
            self.destination_rooms[(d, room_id)] = stream_ordering

    async def get_destination_retry_timings(self, destination):
        return self.retry_timings.get(destination)

    async def get_destination_retry_timings_batch(self, destinations):
        return {d: self.retry_timings.get(d) for d in destinations}

    async def set_destination_retry_timings(self, destination, failure_ts, retry_last_ts, retry_interval):
        self.retry_timings[destination] = SimpleNamespace(
            failure_ts=failure_ts, retry_last_ts=retry_last_ts, retry_interval=retry_interval
        )

    async def get_destination_last_successful_stream_ordering(self, destination):
        return self.last_successful.get(destination)

    async def set_destination_last_successful_stream_ordering(self, destination, stream_ordering):
        self.last_successful[destination] = stream_ordering

    async def get_catch_up_outstanding_destinations(self, after_destination):
        return []

    def get_to_device_stream_token(self):
        return 0

    async def get_new_device_msgs_for_remote(self, destination, last_stream_id, current_stream_id, limit):
        return [], current_stream_id

    async def get_device_updates_by_remote(self, destination, from_stream_id, limit):
        return from_stream_id, []


class RoomState:
    """hs.get_state_handler(): the hosts joined at every event's prev_events."""

    def __init__(self, hosts):
        self._hosts = frozenset(hosts)

    async def get_hosts_in_room_at_events(self, room_id, event_ids):
        return self._hosts


class InstantFederationHttpClient:
    """hs.get_federation_http_client(): PUTs answered 200 at the next reactor turn.

    Does per request what MatrixFederationHttpClient does before the network (the request
    object, the retry limiter, the canonical JSON body) and hands each to `sent` with the
    depths of its PDUs (a PDU's depth is its stream ordering in this workload).
    """

    def __init__(self, hs, sent, sign):
        self._hs = hs
        self._sent = sent
        # build_auth_headers reads only these two attributes of the real client.
        self._signer = SimpleNamespace(server_name=hs.hostname, signing_key=hs.signing_key) if sign else None

    async def put_json(
        self,
        destination,
        path,
        args=None,
        data=None,
        json_data_callback=None,
        long_retries=False,
        timeout=None,
        ignore_backoff=False,
        backoff_on_404=False,
        try_trailing_slash_on_400=False,
        parser=None,
        backoff_on_all_error_codes=False,
    ):
        request = MatrixFederationRequest(
            method="PUT", destination=destination, path=path, query=args, json_callback=json_data_callback, json=data
        )
        limiter = await get_retry_limiter(
            destination=destination,
            our_server_name=self._hs.hostname,
            hs=self._hs,
            clock=self._hs.get_clock(),
            store=self._hs.get_datastores().main,
            backoff_on_404=backoff_on_404,
            ignore_backoff=ignore_backoff,
            notifier=None,
            replication_client=None,
            backoff_on_all_error_codes=backoff_on_all_error_codes,
        )
        with limiter:
            content = request.get_json()
            if self._signer is not None:
                # The transaction PUT has no query string, so the signed URI is the path.
                headers = MatrixFederationHttpClient.build_auth_headers(
                    self._signer, destination.encode("ascii"), b"PUT", request.path.encode("ascii"), content
                )
                assert headers and headers[0].startswith(b"X-Matrix "), headers
            body = encode_canonical_json(content)
            self._sent(destination, body, [p["depth"] for p in content["pdus"]])
            answered = defer.Deferred()
            reactor.callLater(0, answered.callback, {"pdus": {}})
            return await make_deferred_yieldable(answered)

    def shutdown(self):
        pass


class BenchHomeServer:
    """Exactly what FederationSender, PerDestinationQueue, TransactionManager and
    TransportLayerClient ask of `hs` on this workload."""

    def __init__(self, store, hosts, instance_id, sent, sign=False):
        self.hostname = ORIGIN
        self.signing_key = generate_signing_key("bench")
        self._instance_id = instance_id
        self._clock = Clock(reactor, server_name=ORIGIN)
        self._store = store
        # Synapse's stores reach the config through their `hs` (the retry limiter does).
        store.hs = self
        self._state = RoomState(hosts)
        federation = FederationConfig(None)
        federation.read_config({})
        self.config = SimpleNamespace(
            worker=SimpleNamespace(federation_shard_config=ShardedWorkerHandlingConfig(["master"])),
            federation=federation,
            ratelimiting=SimpleNamespace(federation_rr_transactions_per_room_per_second=50),
            experimental=SimpleNamespace(msc4354_enabled=False),
            server=SimpleNamespace(track_presence=True),
            redis=SimpleNamespace(redis_enabled=False),
        )
        self._external_cache = ExternalCache(self)
        self._module_api_callbacks = SimpleNamespace(federation=FederationModuleApiCallbacks())
        self._http_client = InstantFederationHttpClient(self, sent, sign)
        self._transport_client = TransportLayerClient(self)

    def get_clock(self):
        return self._clock

    def get_datastores(self):
        return SimpleNamespace(main=self._store)

    def get_state_handler(self):
        return self._state

    def get_storage_controllers(self):
        # Used only by catch-up and sticky events, neither of which this workload reaches.
        return None

    def is_mine_id(self, string):
        return get_domain_from_id(string) == self.hostname

    def is_mine_server_name(self, server_name):
        return server_name == self.hostname

    def get_instance_name(self):
        return "master"

    def get_instance_id(self):
        return self._instance_id

    def get_external_cache(self):
        return self._external_cache

    def get_module_api_callbacks(self):
        return self._module_api_callbacks

    def get_federation_http_client(self):
        return self._http_client

    def get_federation_transport_client(self):
        return self._transport_client

    def run_as_background_process(self, desc, func, *args, **kwargs):
        return run_as_background_process(desc, self.hostname, func, *args, **kwargs)


def run_burst(events, destinations, run_number, keep_bodies, sign=False):
    """One run: a fresh sender, the whole burst, drained. Returns (measurements, transactions
    as (destination, body length or the body itself if `keep_bodies`, PDU depths))."""
    hosts = [destination(i) for i in range(destinations)]
    store = BurstStore(events)
    sent = []

    # Keeping every body would hold ~600 MB at the default size and inflate the peak RSS.
    def record(d, body, depths):
        sent.append((d, body if keep_bodies else len(body), depths))

    hs = BenchHomeServer(store, hosts, f"bench-{run_number}", record, sign)
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sender = FederationSender(hs)
    sender.notify_new_events(RoomStreamToken(stream=len(events)))

    # Synapse offers no "idle" signal; its own fields say whether the event loop or any
    # destination's transmission loop still has work.
    def busy():
        return sender._is_processing or any(
            q.transmission_loop_running for q in sender._per_destination_queues.values()
        )

    while busy():
        reactor.iterate(0)
        if time.perf_counter() - wall0 > RUN_LIMIT_S:
            raise RuntimeError("the sender did not drain the burst")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    sender.shutdown()
    hs.get_clock().shutdown()
    for gauge in all_later_gauges_to_clean_up_on_shutdown.values():
        gauge.unregister_hooks_for_homeserver_instance_id(hs.get_instance_id())
    return summarize(events, hosts, sent, cpu, wall), sent


def summarize(events, hosts, sent, cpu_s, wall_s):
    """Counts from what was encoded into the bodies: each PDU is recognised by its depth (its
    stream ordering in this workload), so the check does not trust the sender's bookkeeping."""
    txns = {h: 0 for h in hosts}
    next_event = {h: 1 for h in hosts}
    out_of_order = set()
    pairs = body_bytes = 0
    for d, body, depths in sent:
        txns[d] += 1
        body_bytes += body if isinstance(body, int) else len(body)
        for depth in depths:
            pairs += 1
            if depth == next_event[d]:
                next_event[d] += 1
            else:
                out_of_order.add(d)
    incomplete = sum(1 for h in hosts if h in out_of_order or next_event[h] != len(events) + 1)
    return {
        "cpu_ns": round(cpu_s * 1e9),
        "wall_ns": round(wall_s * 1e9),
        "txns": len(sent),
        "pairs": pairs,
        "bytes": body_bytes,
        "txns_per_destination_min": min(txns.values()),
        "txns_per_destination_max": max(txns.values()),
        "incomplete": incomplete,
    }


def write_transcript(path, sent):
    with open(path, "w") as f:
        for d, body, depths in sent:
            f.write(json.dumps({"destination": d, "stream_orderings": depths, "body": body.decode()}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sign", action="store_true", help="sign every request as Synapse's federation client does")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--transcript", help="write the last run's transactions as JSON lines")
    args = parser.parse_args()
    if args.events < 1 or args.destinations < 1 or args.runs < 1:
        parser.error("--events, --destinations and --runs must be at least 1")

    events = persisted_events(args.events)
    runs = []
    for n in range(args.warmup + args.runs):
        last = n == args.warmup + args.runs - 1
        result, sent = run_burst(
            events, args.destinations, n, keep_bodies=last and bool(args.transcript), sign=args.sign
        )
        if n >= args.warmup:
            runs.append(result)
        print(
            f"synapse run {n + 1}/{args.warmup + args.runs}{' (warm-up)' if n < args.warmup else ''}: "
            f"{result['cpu_ns'] / 1e9:.2f} s CPU",
            file=sys.stderr,
        )
    if args.transcript:
        write_transcript(args.transcript, sent)
    out = {
        "synapse_version": importlib.metadata.version("matrix-synapse"),
        "python": platform.python_version(),
        "events": args.events,
        "destinations": args.destinations,
        "signed": args.sign,
        "runs": runs,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    text = json.dumps(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
