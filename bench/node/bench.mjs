#!/usr/bin/env node
// bench/node/bench.mjs — the Node engine of fedsend-bench: the same instant host and workload
// generator as bench/src/lib.rs, in JavaScript, driving the wasm-bindgen `FederationSender`
// (host-wasm/pkg/node, built by scripts/build-wasm.sh). `target/release/fedsend-bench` spawns it;
// it prints JSON on stdout:
//
//   node bench/node/bench.mjs --sizes JSON --workload W1|W2|W3|W4|W5|WS --runs N --warmup N
//       → {"runs":[RunResult, …]}  (the fields of fedsend_bench::RunResult)
//   node bench/node/bench.mjs --sizes JSON --probe idle|queued-a|queued-b
//       → one number: bytes per idle destination, or bytes per queued event (slope) with the
//         first/second destination count of the queued probe
//
// Core time is measured inside the process around handleInput plus the pollOutput calls that
// drain it; JSON.stringify of inputs and JSON.parse of outputs are host work, not counted.
// Memory is the size of the wasm linear memory (caught when the package instantiates it; what
// process.memoryUsage().external mostly is). It only grows, so every probe needs a fresh process.
//
// Everything here must stay in step with bench/src/lib.rs: the bench checks that both report
// the same transaction, pair, byte and input counts.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

const PKG = fileURLToPath(new URL('../../host-wasm/pkg/node/fedsend_wasm.js', import.meta.url));
// Catch the instance wasm-bindgen creates, to read its linear memory (the package keeps it private).
let instance;
const OriginalInstance = WebAssembly.Instance;
WebAssembly.Instance = function (module, imports) {
  instance = new OriginalInstance(module, imports);
  return instance;
};
const { FederationSender } = createRequire(import.meta.url)(PKG);
WebAssembly.Instance = OriginalInstance;

const ORIGIN = 'origin.test';
const T0 = 1_700_000_000_000;
const EVENT_BATCH = 100;
const W5_BATCH = 500;
const W5_LARGE_EVERY = 100;
const W5_LARGE_DEVICES = 20;
const W5_LARGE_CIPHERTEXT_BYTES = 4000;
const W5_SMALL_CIPHERTEXT_BYTES = 200;
const CONFIG = JSON.stringify({ server_name: ORIGIN, seed: 1, presence_enabled: true });
// The kinds of EDU W4 expects every server of the room to receive, as they appear in a body.
const EDU_KINDS = ['"edu_type":"m.receipt"', '"edu_type":"m.presence"', '"edu_type":"m.typing"'];

const destination = (i) => `d${i}.test`;
const roomId = (r) => `!r${r}:${ORIGIN}`;
const eventId = (k) => `$ev${k}`;

function pdu(k, room) {
  return {
    auth_events: [
      '$create-event-id-000000000000000000000000000',
      '$power-levels-event-id-0000000000000000000000',
      '$member-event-id-0000000000000000000000000000',
    ],
    content: { body: `benchmark message number ${k}`, msgtype: 'm.text' },
    depth: k,
    hashes: { sha256: 'ThisIsAFakeContentHashOfFortyThreeCharacter' },
    origin_server_ts: T0 + k,
    prev_events: [`$ev${k - 1}`],
    room_id: room,
    sender: `@alice:${ORIGIN}`,
    signatures: {
      [ORIGIN]: {
        'ed25519:a_key': 'ThisIsAFakeSignatureOfEightySixCharactersThisIsAFakeSignatureOfEightySixCharactersXX',
      },
    },
    type: 'm.room.message',
  };
}

const byString = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

const localUser = (u) => `@u${u}:${ORIGIN}`;

/** EDUs in a transaction body (bench/src/lib.rs `edus_in_body`). */
const edusInBody = (body) => body.split('"edu_type":"').length - 1;

/** W4: user u's read receipt in a round (bench/src/lib.rs `w4_receipt`). */
function w4Receipt(round, u, receivedTs, hosts) {
  return {
    type: 'receipt',
    receipt: {
      room_id: roomId(0),
      receipt_type: 'm.read',
      user_id: localUser(u),
      event_id: `$w4ev${round}.${u}`,
      data: { ts: T0 + round * 1000 + u },
    },
    hosts,
    event: { sender: '@bob:d1.test', received_ts: receivedTs },
  };
}

/** W4: every user's presence in a round (bench/src/lib.rs `w4_presence`). */
function w4Presence(round, users, now) {
  return range(0, users).map((u) => {
    const state = {
      user_id: localUser(u),
      presence: (round + u) % 3 === 0 ? 'unavailable' : 'online',
      last_active_ts: now - 1000 * u,
      currently_active: u % 2 === 0,
    };
    if (u % 4 === 0) state.status_msg = `status ${round}`;
    return state;
  });
}

function w5Ciphertext(k, device, len) {
  const head = `${k}.${device}.`;
  return head.length >= len ? head : head + 'A'.repeat(len - head.length);
}

/** W5: to-device message k (bench/src/lib.rs `w5_message`). */
function w5Message(k, destinations) {
  const user = `@u${k % 7}:d${k % destinations}.test`;
  const large = k % W5_LARGE_EVERY === 0;
  const devices = large ? W5_LARGE_DEVICES : 1;
  const len = large ? W5_LARGE_CIPHERTEXT_BYTES : W5_SMALL_CIPHERTEXT_BYTES;
  const first = devices === 1 ? k % 3 : 0;
  const byDevice = {};
  for (let d = first; d < first + devices; d++) {
    byDevice[`DEV${d}`] = {
      algorithm: 'm.olm.v1.curve25519-aes-sha2',
      ciphertext: w5Ciphertext(k, d, len),
      sender_key: 'SenderCurve25519KeyOfFortyThreeCharactersXX',
    };
  }
  return {
    type: 'to_device',
    sender: `@alice:${ORIGIN}`,
    message_type: 'm.room.encrypted',
    message_id: `w5m${k}`,
    messages: { [user]: byDevice },
  };
}

/** Sender-owned storage, in memory (bench/src/lib.rs `Store`). */
class Store {
  constructor() {
    this.rows = new Map(); // destination → Map(room → stream ordering)
    this.delivered = new Map();
    this.sorted = null;
    this.outbox = new Set(); // `${destination} ${outbox_id}` of rows not yet deleted
  }
  set(dest, room, so) {
    let rooms = this.rows.get(dest);
    if (rooms === undefined) {
      rooms = new Map();
      this.rows.set(dest, rooms);
      this.sorted = null;
    }
    rooms.set(room, Math.max(rooms.get(room) ?? 0, so));
  }
  apply(changes) {
    for (const row of changes.destination_rooms ?? []) this.set(row.destination, row.room_id, row.stream_ordering);
    for (const state of changes.destinations ?? []) {
      if (state.last_successful_stream_ordering != null) {
        this.delivered.set(state.destination, state.last_successful_stream_ordering);
      }
    }
    for (const row of changes.to_device_outbox ?? []) this.outbox.add(`${row.destination} ${row.outbox_id}`);
    for (const key of changes.to_device_deleted ?? []) this.outbox.delete(`${key.destination} ${key.outbox_id}`);
  }
  catchUp(dest, after, upTo, limit) {
    const rows = [];
    for (const [room, so] of this.rows.get(dest) ?? []) if (so > after && so <= upTo) rows.push([room, so]);
    rows.sort((a, b) => a[1] - b[1] || byString(a[0], b[0]));
    return rows.slice(0, limit);
  }
  outstanding(after, limit) {
    this.sorted ??= [...this.rows.keys()].sort(byString);
    const names = [];
    for (const dest of this.sorted) {
      if (after != null && dest <= after) continue;
      let newest = 0;
      for (const so of this.rows.get(dest).values()) newest = Math.max(newest, so);
      if (newest > (this.delivered.get(dest) ?? 0)) {
        names.push(dest);
        if (names.length >= limit) break;
      }
    }
    return names;
  }
}

function catchUpRoom(room, so) {
  const p = pdu(so, room);
  return {
    room_id: room,
    stream_ordering: so,
    event_id: eventId(so),
    pdu: p,
    partial_state: false,
    extremities: [{ event_id: eventId(so), stream_ordering: so, visible: true, pdu: p }],
  };
}

/** The wasm linear memory in bytes (a high-water mark: it never shrinks). */
function externalMemory() {
  return instance?.exports.memory?.buffer.byteLength ?? process.memoryUsage().external;
}

/** The instant host around one FederationSender (bench/src/lib.rs `Host`). */
class Host {
  constructor(world) {
    this.now = T0;
    this.world = world; // { rooms: [[dest]], eventRooms: [r], produced }
    this.store = new Store();
    this.keepStore = true;
    this.failing = new Set();
    this.hold = false;
    this.eduKinds = new Map(); // destination → bits of EDU_KINDS received (W4)
    this.deliveries = null; // WS: destination → { txns, nextEvent, outOfOrder }
    this.queue = [];
    this.head = 0;
    this.samples = [];
    this.sender = null;
    this.result = {
      core_ns: 0, fanout_ns: 0, wall_ns: 0, cpu_ns: 0, inputs: 0, txns: 0, attempts: 0, pairs: 0, enqueued: 0, bytes: 0,
      median_ns: 0, p99_ns: 0, peak_memory: 0, catch_ups_finished: 0, rows_owed: 0, incomplete: 0,
      txns_per_destination_min: 0, txns_per_destination_max: 0,
    };
    this.started = performance.now();
    this.cpuStarted = process.cpuUsage();
  }

  start(recovered) {
    this.sender?.free();
    const strings = [];
    const t0 = performance.now();
    this.sender = new FederationSender(CONFIG, JSON.stringify(recovered));
    for (let s; (s = this.sender.pollOutput()) !== undefined; ) strings.push(s);
    this.result.core_ns += Math.round((performance.now() - t0) * 1e6);
    for (const s of strings) this.answer(JSON.parse(s));
    this.run();
  }

  run() {
    const sender = this.sender;
    const strings = [];
    while (this.head < this.queue.length) {
      const input = this.queue[this.head];
      this.queue[this.head++] = undefined;
      if (this.head > 65536) {
        this.queue = this.queue.slice(this.head);
        this.head = 0;
      }
      const json = JSON.stringify(input);
      strings.length = 0;
      const t0 = performance.now();
      sender.handleInput(this.now, json);
      for (let s; (s = sender.pollOutput()) !== undefined; ) strings.push(s);
      const ns = Math.round((performance.now() - t0) * 1e6);
      this.result.core_ns += ns;
      this.result.inputs += 1;
      if (input.type === 'events_fetched') this.result.fanout_ns += ns;
      this.samples.push(ns);
      for (const s of strings) this.answer(JSON.parse(s));
    }
  }

  advanceTo(t) {
    for (let i = 0; i < 1_000_000; i++) {
      const deadline = this.sender.pollTimeout();
      if (deadline === undefined || deadline > t) break;
      this.now = Math.max(this.now, deadline);
      this.queue.push({ type: 'timeout' });
      this.run();
    }
    this.now = Math.max(this.now, t);
  }

  produce(count) {
    this.world.produced += count;
    this.queue.push({ type: 'new_events', up_to: this.world.produced });
    this.run();
  }

  event(k) {
    const r = this.world.eventRooms[k - 1];
    const room = roomId(r);
    return {
      event_id: eventId(k),
      room_id: room,
      stream_ordering: k,
      sender: `@alice:${ORIGIN}`,
      hosts: this.world.rooms[r],
      pdu: pdu(k, room),
    };
  }

  answer(out) {
    let input;
    switch (out.type) {
      case 'send_transaction': {
        this.result.attempts += 1;
        if (out.attempt === 1) {
          this.result.txns += 1;
          this.result.pairs += out.pdu_ids.length + edusInBody(out.body);
          this.result.bytes += Buffer.byteLength(out.body);
          let kinds = 0;
          EDU_KINDS.forEach((kind, i) => {
            if (out.body.includes(kind)) kinds |= 1 << i;
          });
          if (kinds !== 0) this.eduKinds.set(out.destination, (this.eduKinds.get(out.destination) ?? 0) | kinds);
          if (this.deliveries !== null) {
            let d = this.deliveries.get(out.destination);
            if (d === undefined) {
              d = { txns: 0, nextEvent: 1, outOfOrder: false };
              this.deliveries.set(out.destination, d);
            }
            d.txns += 1;
            for (const id of out.pdu_ids) {
              if (id === eventId(d.nextEvent)) d.nextEvent += 1;
              else d.outOfOrder = true;
            }
          }
        }
        if (this.hold) return;
        const outcome = this.failing.has(out.destination) ? 'unreachable' : 'ok';
        input = { type: 'transaction_done', request: out.request, result: { outcome } };
        break;
      }
      case 'fetch_events': {
        const end = Math.min(this.world.produced, out.after + out.limit);
        const events = [];
        for (let k = out.after + 1; k <= end; k++) events.push(this.event(k));
        for (const e of events) this.result.enqueued += e.hosts.length;
        input = { type: 'events_fetched', request: out.request, events };
        break;
      }
      case 'persist':
        if (this.keepStore) this.store.apply(out.changes);
        input = { type: 'persisted', request: out.request };
        break;
      case 'load_catch_up': {
        const rows = this.store.catchUp(out.destination, out.after, out.up_to, out.limit);
        input = { type: 'catch_up_loaded', request: out.request, rooms: rows.map(([room, so]) => catchUpRoom(room, so)) };
        break;
      }
      case 'load_outstanding':
        input = { type: 'outstanding_loaded', request: out.request, destinations: this.store.outstanding(out.after, out.limit) };
        break;
      case 'event':
        if (out.event.event === 'catch_up_finished') this.result.catch_ups_finished += 1;
        return;
      default:
        return;
    }
    this.queue.push(input);
  }

  finish() {
    this.result.wall_ns = Math.round((performance.now() - this.started) * 1e6);
    // The whole process (V8's helper threads included), in µs.
    const cpu = process.cpuUsage(this.cpuStarted);
    this.result.cpu_ns = (cpu.user + cpu.system) * 1000;
    const s = Float64Array.from(this.samples).sort();
    const at = (q) => (s.length === 0 ? 0 : s[Math.round((s.length - 1) * q)]);
    this.result.median_ns = at(0.5);
    this.result.p99_ns = at(0.99);
    this.result.peak_memory = externalMemory();
    this.sender.free();
    this.sender = null;
    return this.result;
  }
}

const range = (a, b) => Array.from({ length: Math.max(0, b - a) }, (_, i) => a + i);
const fresh = () => ({ incarnation: 0, events_out_pos: 0, destinations: [] });
const w2RoomSize = (r) => 4 + ((r * 7919) % 33);

function runWorkload(name, sizes) {
  switch (name) {
    case 'W1': {
      const host = new Host({
        rooms: [range(0, sizes.w1_destinations).map(destination)],
        eventRooms: new Array(sizes.w1_repeats).fill(0),
        produced: 0,
      });
      host.start(fresh());
      host.advanceTo(T0);
      for (let i = 0; i < sizes.w1_repeats; i++) {
        host.advanceTo(host.now + 1000);
        host.produce(1);
      }
      return host.finish();
    }
    case 'W2': {
      const d = sizes.w2_destinations;
      const rooms = range(0, sizes.w2_rooms).map((r) =>
        range(0, Math.min(w2RoomSize(r), d)).map((j) => destination((r * 97 + j) % d)),
      );
      const host = new Host({ rooms, eventRooms: range(0, sizes.w2_events).map((k) => k % sizes.w2_rooms), produced: 0 });
      host.failing = new Set(range(0, d).filter((i) => i % 50 === 7).map(destination));
      host.start(fresh());
      host.advanceTo(T0);
      for (let b = 0; b < Math.floor(sizes.w2_events / EVENT_BATCH); b++) {
        host.advanceTo(host.now + 100);
        host.produce(EVENT_BATCH);
      }
      return host.finish();
    }
    case 'W3': {
      const d = sizes.w3_destinations;
      const nRooms = sizes.w3_rooms;
      const step = Math.max(1, Math.floor(d / nRooms));
      const members = Math.min(sizes.w3_rooms_per_destination * step, d);
      const rooms = range(0, nRooms).map((r) => range(0, members).map((j) => destination((r * step + j) % d)));
      const events = nRooms * sizes.w3_events_per_room;
      const host = new Host({ rooms, eventRooms: range(0, events).map((k) => k % nRooms), produced: events });
      rooms.forEach((hosts, r) => {
        const newest = events - nRooms + r + 1;
        for (const h of hosts) host.store.set(h, roomId(r), newest);
      });
      for (const rs of host.store.rows.values()) host.result.rows_owed += rs.size;
      const destinations = range(0, d).map((i) => {
        host.store.delivered.set(destination(i), 0);
        return {
          destination: destination(i),
          retry_last_ts: T0 - 3_600_000,
          retry_interval: 7_200_000,
          failure_ts: T0 - 14_400_000,
          last_successful_stream_ordering: 0,
        };
      });
      host.start({ incarnation: 7, events_out_pos: events, destinations });
      host.advanceTo(T0);
      for (let i = 0; i < d; i++) host.queue.push({ type: 'remote_up', destination: destination(i) });
      host.run();
      return host.finish();
    }
    case 'W4': {
      const hosts = range(0, sizes.w4_destinations).map(destination);
      const d = hosts.length;
      const users = sizes.w4_users;
      const half = Math.floor(users / 2);
      const host = new Host({ rooms: [], eventRooms: [], produced: 0 });
      host.start(fresh());
      host.advanceTo(T0);
      for (let round = 0; round < sizes.w4_rounds; round++) {
        for (let u = 0; u < half; u++) host.queue.push(w4Receipt(round, u, host.now - 600_000, hosts));
        host.queue.push({ type: 'presence', states: w4Presence(round, users, host.now), destinations: hosts });
        host.result.enqueued += (half + users) * d;
        host.run();
        host.advanceTo(host.now + 35_000);
        const typing = (u, on) => ({ type: 'typing', room_id: roomId(0), user_id: localUser(u), typing: on, hosts });
        for (let u = 0; u < users; u++) host.queue.push(typing(u, true));
        for (let u = half; u < users; u++) host.queue.push(w4Receipt(round, u, host.now - 1000, hosts));
        for (let u = 0; u < users; u++) host.queue.push(typing(u, false));
        host.result.enqueued += (2 * users + (users - half)) * d;
        host.run();
        host.advanceTo(host.now + 5000);
      }
      host.advanceTo(host.now + 60_000);
      host.result.incomplete = hosts.filter((h) => (host.eduKinds.get(h) ?? 0) !== 7).length;
      return host.finish();
    }
    case 'W5': {
      const host = new Host({ rooms: [], eventRooms: [], produced: 0 });
      host.start(fresh());
      host.advanceTo(T0);
      let k = 0;
      while (k < sizes.w5_messages) {
        host.advanceTo(host.now + 100);
        const batch = Math.min(W5_BATCH, sizes.w5_messages - k);
        for (let i = 0; i < batch; i++) {
          k += 1;
          host.queue.push(w5Message(k, sizes.w5_destinations));
          host.result.enqueued += 1;
        }
        host.run();
      }
      host.advanceTo(host.now + 60_000);
      host.result.incomplete = host.store.outbox.size;
      return host.finish();
    }
    case 'WS': {
      // bench/src/lib.rs `Workload::WS`: the whole burst in one notification, drained to the end.
      const hosts = range(0, sizes.ws_destinations).map(destination);
      const host = new Host({ rooms: [hosts], eventRooms: new Array(sizes.ws_events).fill(0), produced: 0 });
      host.deliveries = new Map();
      host.start(fresh());
      host.advanceTo(T0);
      host.produce(sizes.ws_events);
      const complete = (h) => {
        const d = host.deliveries.get(h);
        return d !== undefined && !d.outOfOrder && d.nextEvent === sizes.ws_events + 1;
      };
      host.result.incomplete = hosts.filter((h) => !complete(h)).length;
      const txns = hosts.map((h) => host.deliveries.get(h)?.txns ?? 0);
      host.result.txns_per_destination_min = Math.min(...txns);
      host.result.txns_per_destination_max = Math.max(...txns);
      host.deliveries = null;
      return host.finish();
    }
    default:
      throw new Error(`unknown workload ${name}`);
  }
}

function probeIdle(sizes) {
  const [n1, n2] = sizes.idle_destinations;
  const events = n2 / 100;
  const host = new Host({
    rooms: range(0, events).map((r) => range(r * 100, r * 100 + 100).map(destination)),
    eventRooms: range(0, events),
    produced: 0,
  });
  host.keepStore = false;
  host.start(fresh());
  host.advanceTo(T0);
  let first = 0;
  for (let k = 1; k <= events; k++) {
    host.produce(1);
    if (k * 100 === n1) first = externalMemory();
  }
  return (externalMemory() - first) / (n2 - n1);
}

function probeQueued(sizes, destinations) {
  const [e1, e2] = sizes.queued_events;
  const host = new Host({ rooms: [range(0, destinations).map(destination)], eventRooms: new Array(e2).fill(0), produced: 0 });
  host.keepStore = false;
  host.hold = true;
  host.start(fresh());
  host.advanceTo(T0);
  let first = 0;
  while (host.world.produced < e2) {
    host.produce(EVENT_BATCH);
    if (host.world.produced === e1) first = externalMemory();
  }
  return (externalMemory() - first) / (e2 - e1);
}

function main(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) opts[argv[i].replace(/^--/, '')] = argv[i + 1];
  const sizes = JSON.parse(opts.sizes);
  let result;
  if (opts.probe === 'idle') result = probeIdle(sizes);
  else if (opts.probe === 'queued-a') result = probeQueued(sizes, sizes.queued_destinations[0]);
  else if (opts.probe === 'queued-b') result = probeQueued(sizes, sizes.queued_destinations[1]);
  else {
    const runs = Number(opts.runs ?? 3);
    const warmup = Number(opts.warmup ?? 1);
    for (let i = 0; i < warmup; i++) runWorkload(opts.workload, sizes);
    result = { runs: range(0, runs).map(() => runWorkload(opts.workload, sizes)) };
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main(process.argv.slice(2));
