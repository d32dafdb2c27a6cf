#!/usr/bin/env node
// bench/node/driven.mjs — the npm package's driven FederationSender end to end (BENCHMARKS.md,
// "The npm package's driven sender"): the package's own loop, MemoryStore and callbacks, an
// instant transport (every transaction answered 200 at once) and a virtual clock that jumps to
// the next timer as soon as nothing else is pending. Needs npm/dist (scripts/build-wasm.sh).
//
//   node bench/node/driven.mjs [--destinations N] [--events N] [--messages N] [--runs N]
//       → one JSON object per run on stdout:
//         pdus: N events in one room shared with every destination, announced 100 at a time;
//               done when every destination has acknowledged the last one
//         to_device: N to-device messages, each awaited until durable, spread over the
//               destinations; done when every one has been sent
//         boundary: ns per value across the wasm boundary (only with a package whose wasm has
//               BoundaryProbe): a to-device input as JSON text made in JavaScript, as an object
//               (stringified inside the binding) and, where the probe has it (commit a622c7d),
//               as an object read by serde_wasm_bindgen; a transaction output as JSON text
//               parsed in JavaScript and as an object
//
// Wall time includes everything a homeserver would pay for: the JavaScript callbacks, the
// store, the boundary crossings and the core; cpu_ms is the process's CPU time over the same
// span (it includes the garbage collector's threads, so it can exceed wall time).

import { performance } from 'node:perf_hooks';
import * as fedsend from '../../npm/src/node.js';
import * as wasm from '../../npm/dist/fedsend_wasm.js';

const ORIGIN = 'origin.test';
const T0 = 1_700_000_000_000;
const ANNOUNCE_BATCH = 100;
const ROOM = `!room:${ORIGIN}`;

const args = Object.fromEntries(
  process.argv.slice(2).flatMap((arg, i, all) => (arg.startsWith('--') ? [[arg.slice(2), Number(all[i + 1])]] : [])),
);
const DESTINATIONS = args.destinations ?? 20;
const EVENTS = args.events ?? 2000;
const MESSAGES = args.messages ?? 5000;
const RUNS = args.runs ?? 3;

const destination = (i) => `d${i}.test`;

/** Time moves only when nothing else is pending; then to the earliest timer, at once. */
class InstantClock {
  #now = T0;
  #timers = new Map();
  #next = 1;
  #scheduled = false;
  now = () => this.#now;
  setTimeout = (fn, ms) => {
    const id = this.#next++;
    this.#timers.set(id, { at: this.#now + ms, fn });
    this.#schedule();
    return id;
  };
  clearTimeout = (id) => {
    this.#timers.delete(id);
  };
  #schedule() {
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      let due = null;
      for (const [id, timer] of this.#timers) if (due === null || timer.at < due[1].at) due = [id, timer];
      if (!due) return;
      this.#timers.delete(due[0]);
      this.#now = Math.max(this.#now, due[1].at);
      due[1].fn();
      if (this.#timers.size) this.#schedule();
    });
  }
}

function makeEvent(k) {
  const event_id = `$ev${k}`;
  return {
    event_id,
    room_id: ROOM,
    stream_ordering: k,
    sender: `@alice:${ORIGIN}`,
    hosts: [ORIGIN, ...Array.from({ length: DESTINATIONS }, (_, i) => destination(i))],
    pdu: {
      event_id,
      room_id: ROOM,
      sender: `@alice:${ORIGIN}`,
      type: 'm.room.message',
      depth: k,
      origin_server_ts: T0 + k,
      content: { body: `benchmark message number ${k}`, msgtype: 'm.text' },
    },
  };
}

async function startSender(events, counters) {
  const clock = new InstantClock();
  const byOrdering = new Map(events.map((e) => [e.stream_ordering, e]));
  const store = new fedsend.MemoryStore();
  const sender = await fedsend.FederationSender.start({
    config: { server_name: ORIGIN },
    clock,
    store,
    homeserver: {
      fetchEvents: ({ after, limit }) => events.slice(after, after + limit),
      loadCatchUp: ({ rows }) =>
        rows.map(({ room_id, stream_ordering }) => {
          const e = byOrdering.get(stream_ordering);
          return { room_id, stream_ordering, event_id: e.event_id, pdu: e.pdu, extremities: [] };
        }),
    },
    transport: {
      sendTransaction: (_destination, _txnId, body) => {
        counters.transactions++;
        counters.bytes += body.length;
        for (let at = 0; (at = body.indexOf('"m.direct_to_device"', at) + 1) > 0; ) counters.toDevice++;
        return { status: 200, body: { pdus: {} } };
      },
    },
    onError: (e) => {
      throw e;
    },
  });
  return { sender, clock, store };
}

async function until(condition) {
  while (!condition()) await new Promise((resolve) => setImmediate(resolve));
}

async function pdus() {
  const events = Array.from({ length: EVENTS }, (_, i) => makeEvent(i + 1));
  const counters = { transactions: 0, bytes: 0, toDevice: 0 };
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  const { sender } = await startSender(events, counters);
  for (let upTo = ANNOUNCE_BATCH; upTo <= EVENTS; upTo += ANNOUNCE_BATCH) await sender.newEvents(upTo);
  await until(() => {
    const stats = sender.destinationStats();
    return stats.length === DESTINATIONS && stats.every((s) => s.last_successful_stream_ordering === EVENTS);
  });
  const ms = performance.now() - t0;
  const cpu = cpuMs(cpu0);
  await sender.close();
  const pairs = EVENTS * DESTINATIONS;
  return { workload: 'pdus', events: EVENTS, destinations: DESTINATIONS, pairs, transactions: counters.transactions, ms: round(ms), cpu_ms: cpu, pairs_per_s: Math.round((pairs / ms) * 1000), pairs_per_cpu_s: Math.round((pairs / cpu) * 1000) };
}

async function toDevice() {
  const counters = { transactions: 0, bytes: 0, toDevice: 0 };
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  const { sender } = await startSender([], counters);
  const durable = [];
  for (let k = 0; k < MESSAGES; k++) {
    durable.push(
      sender.sendToDevice({
        sender: `@alice:${ORIGIN}`,
        message_type: 'm.room.encrypted',
        message_id: `m${k}`,
        messages: { [`@u${k % 7}:${destination(k % DESTINATIONS)}`]: { [`DEV${k % 3}`]: { algorithm: 'm.olm.v1.curve25519-aes-sha2', ciphertext: 'A'.repeat(200), sender_key: 'SenderCurve25519KeyOfFortyThreeCharactersXX' } } },
      }),
    );
  }
  await Promise.all(durable);
  const durableMs = performance.now() - t0;
  // One EDU per message here (each addresses one user on one destination).
  await until(() => counters.toDevice >= MESSAGES);
  const ms = performance.now() - t0;
  const cpu = cpuMs(cpu0);
  await sender.close();
  return { workload: 'to_device', messages: MESSAGES, destinations: DESTINATIONS, transactions: counters.transactions, durable_ms: round(durableMs), ms: round(ms), cpu_ms: cpu, messages_per_s: Math.round((MESSAGES / ms) * 1000), messages_per_cpu_s: Math.round((MESSAGES / cpu) * 1000) };
}

/** ns per crossing of a typical input and output, each way, in the same process. */
function boundary() {
  if (typeof wasm.BoundaryProbe !== 'function') return null;
  const input = {
    type: 'to_device',
    sender: `@alice:${ORIGIN}`,
    message_type: 'm.room.encrypted',
    message_id: 'm1',
    messages: { '@u1:d1.test': { DEV1: { algorithm: 'm.olm.v1.curve25519-aes-sha2', ciphertext: 'A'.repeat(200), sender_key: 'SenderCurve25519KeyOfFortyThreeCharactersXX' } } },
  };
  const probe = new wasm.BoundaryProbe(JSON.stringify({ server_name: ORIGIN }), JSON.stringify(makeEvent(1)));
  const time = (fn) => {
    const n = 20_000;
    for (let i = 0; i < 2000; i++) fn();
    const t0 = performance.now();
    for (let i = 0; i < n; i++) fn();
    return Math.round(((performance.now() - t0) * 1e6) / n);
  };
  const result = {
    workload: 'boundary',
    input_json_ns: time(() => probe.inputFromJson(JSON.stringify(input))),
    input_object_ns: time(() => probe.inputFromObject(input)),
    ...(probe.inputFromObjectSerde ? { input_serde_wasm_bindgen_ns: time(() => probe.inputFromObjectSerde(input)) } : {}),
    output_json_ns: time(() => JSON.parse(probe.outputJson())),
    output_object_ns: time(() => probe.outputObject()),
  };
  probe.free();
  return result;
}

const round = (ms) => Math.round(ms * 10) / 10;

/** CPU time (user + system) of this process since `start`, in ms: steadier than wall time on a
 * shared machine, since time spent waiting for a core is left out. */
function cpuMs(start) {
  const { user, system } = process.cpuUsage(start);
  return round((user + system) / 1000);
}

for (let run = 0; run < RUNS; run++) {
  console.log(JSON.stringify(await pdus()));
  console.log(JSON.stringify(await toDevice()));
  const b = boundary();
  if (b) console.log(JSON.stringify(b));
}
