// The live simulation behind the visualiser, without any DOM, so that node --test covers it.
//
// A `LiveSimulation` (wasm: the simulated world and the core in one module) is started from a
// scenario header and then driven in fixed virtual-time ticks. Each tick first applies the
// user's queued actions, then the seeded workload's events, then advances virtual time by
// TICK_MS. Nothing depends on wall-clock time or frame rate, so the same seed, parameters and
// actions (each recorded with the tick it was applied at) give the same run, trace byte for
// byte. `Model` folds the trace lines and the core's per-destination figures into what the
// page draws.

export const TICK_MS = 100;
export const HOME = 'home.example';
export const START_MS = 1_000_000;
export const LOCAL_USER = `@alice:${HOME}`;

/** The sender's configuration in the visualiser: Synapse's timings shrunk so that retries,
 * backoff, "gone" and catch-up all happen within minutes of virtual time. */
export const LIVE_CONFIG = Object.freeze({
  http_retries_max: 2,
  http_retry_delay_max_ms: 5_000,
  request_timeout_ms: 10_000,
  retry_interval_min_ms: 20_000,
  retry_interval_max_ms: 1_800_000,
  catch_up_threshold_ms: 120_000,
  catch_up_waker_period_ms: 30_000,
  catch_up_waker_interval_ms: 50,
  catch_up_waker_page_max: 100,
  // The presence mix would send nothing without it (the core's default, stated because the
  // workload depends on it).
  presence_enabled: true,
});

/** The workload's EDU mixes: URL/parameter key → what the page calls it. Each is a rate per
 * virtual second. `edus` (typing and receipts) shares the event workload's random stream; the
 * others have a stream each, so changing one of them leaves every other draw as it was. */
export const MIXES = Object.freeze({
  edus: 'typing & receipts',
  presence: 'presence',
  todevice: 'to-device',
  devices: 'device lists',
});

/** Rates of the workload when a parameter is not given (events and EDUs per virtual second). */
export const DEFAULT_PARAMS = Object.freeze({
  seed: 1, destinations: 30, rooms: 4, rate: 2, edus: 1, presence: 0.2, todevice: 0.5, devices: 0.05,
});

/** Actions that carry a number (`value`) rather than a host. */
const VALUE_OPS = new Set(['rate', ...Object.keys(MIXES)]);

/** The presence states our user cycles through. */
const PRESENCE_CYCLE = ['online', 'unavailable', 'online', 'offline'];

/** Our user's devices the device-list mix adds, changes and deletes. */
const LOCAL_DEVICES = ['PHONE', 'LAPTOP', 'TABLET'];

/** Upper bound of the virtual time from a server going down to its destination backing off,
 * once something is queued for it: every HTTP retry delay at its largest jitter, plus the
 * latency of each attempt (≤ 400 ms) and a tick of slack each. */
export function backoffBoundMs(config = LIVE_CONFIG, latencyMaxMs = 400) {
  let total = 0;
  for (let k = 1; k <= config.http_retries_max; k += 1) {
    total += Math.min(4 ** k * 1000, config.http_retry_delay_max_ms) * 1.5 + latencyMaxMs + TICK_MS;
  }
  return total + latencyMaxMs + TICK_MS;
}

// ----- seeded randomness -----

/** mulberry32: a small, fast, seeded 32-bit PRNG. Returns a function giving floats in [0, 1). */
export function prng(seed) {
  let a = (Number(seed) >>> 0) ^ 0x9e3779b9;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** FNV-1a over a string, folded into a running 32-bit hash (the run's digest). */
export function fnv(hash, text) {
  let h = hash >>> 0;
  for (let i = 0; i < text.length; i += 1) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

// ----- the world's shape -----

export function destinationName(i) {
  return `s${String(i + 1).padStart(4, '0')}.example`;
}

export function roomId(r) {
  return `!room${r}:${HOME}`;
}

/**
 * The world for `params` ({ seed, destinations, rooms }): every destination joins room
 * i mod rooms, and about a third join a second room. Remote joins are received events, so
 * they are not sent anywhere. Each remote answers after 20–400 ms.
 */
export function buildWorld({ seed, destinations, rooms }) {
  const random = prng(fnv(0x811c9dc5, `world:${seed}`));
  const names = Array.from({ length: destinations }, (_, i) => destinationName(i));
  const roomsOf = new Map();
  const members = Array.from({ length: rooms }, () => []);
  const latency = new Map();
  names.forEach((name, i) => {
    const mine = [i % rooms];
    if (rooms > 1 && random() < 0.34) {
      const other = (i % rooms + 1 + Math.floor(random() * (rooms - 1))) % rooms;
      mine.push(other);
    }
    roomsOf.set(name, mine.map(roomId));
    for (const r of mine) members[r].push(name);
    latency.set(name, 20 + Math.floor(random() * 381));
  });
  const steps = [];
  for (let r = 0; r < rooms; r += 1) {
    steps.push({ op: 'create_room', room: roomId(r), creator: LOCAL_USER });
    for (const name of members[r]) steps.push({ op: 'join', room: roomId(r), user: `@u:${name}` });
  }
  for (const name of names) steps.push({ op: 'remote', host: name, respond: 'ok', latency_ms: latency.get(name) });
  const header = {
    server_name: HOME,
    seed: Number(seed) >>> 0,
    start_ms: START_MS,
    config: { ...LIVE_CONFIG },
    steps,
  };
  return { header, names, roomsOf, latency, roomIds: Array.from({ length: rooms }, (_, r) => roomId(r)) };
}

// ----- the trace and the core's figures, folded for drawing -----

const ATTEMPTS_KEPT = 40;
const HISTORY_KEPT = 20;

function blankDestination(name, rooms = []) {
  return {
    name,
    rooms, // room ids it shares with us
    state: 'idle', // idle | sending | retrying | backing_off | catching_up | gone (the core's phase)
    stats: null, // the core's DestinationStats, if it knows the destination
    inFlight: null, // { txnId, t, pdus, edus }
    attempts: [], // newest last: { txnId, t, pdus, edus, bytes, outcome, done }
    backoffs: [], // newest last: { t, until, interval }
    sent: 0,
    ok: 0,
    failed: 0,
    delivered: 0, // PDUs in successful transactions
    edusDelivered: 0, // EDUs in successful transactions
    eduKinds: new Map(), // edu_type → EDUs of that type in successful transactions
    dropped: 0,
    received: new Map(), // room → highest stream received
    lastReceived: null, // event id
  };
}

/** Everything the page draws, folded from trace lines and destination figures. */
export class Model {
  constructor({ names = [], roomsOf = new Map(), startMs = START_MS } = {}) {
    this.startMs = startMs;
    this.now = startMs;
    this.dests = new Map();
    this.order = [];
    for (const name of names) this.destination(name, roomsOf.get(name) ?? []);
    this.events = new Map(); // event id → { room, stream, t }
    this.roomEvents = new Map(); // room → [{ stream, t }] of our own events, in order
    this.roomStarted = new Set(); // rooms whose first event was seen
    this.counts = { lines: 0, persisted: 0, send: 0, ok: 0, failed: 0, dropped: 0, snapshot: 0, end: 0, pdus: 0, edus: 0 };
    this.eduKinds = new Map(); // edu_type → EDUs of that type delivered, over every destination
    this.digest = 0x811c9dc5;
    this.samples = []; // { t, delivered, queued, inFlight }
    this.flights = []; // recent attempts (with `dest`), oldest first, for the drawing
    this.snapshot = null;
  }

  destination(name, rooms) {
    let d = this.dests.get(name);
    if (!d) {
      d = blankDestination(name, rooms ?? []);
      this.dests.set(name, d);
      this.order.push(name);
    }
    return d;
  }

  /** Folds trace text (lines joined with '\n', as `takeTrace` returns them). */
  addTraceText(text) {
    if (!text) return;
    this.digest = fnv(this.digest, `${text}\n`);
    for (const line of text.split('\n')) this.addLine(JSON.parse(line));
  }

  addLine(line) {
    this.counts.lines += 1;
    if (line.t !== undefined) this.now = Math.max(this.now, line.t);
    switch (line.kind) {
      case 'persisted': {
        this.counts.persisted += 1;
        this.events.set(line.event, { room: line.room, stream: line.stream, t: line.t, local: line.sender.endsWith(`:${HOME}`) });
        break;
      }
      case 'send': {
        this.counts.send += 1;
        const d = this.destination(line.dest);
        const attempt = {
          txnId: line.txn_id, t: line.t, pdus: line.pdus.length, edus: line.edus.length, bytes: line.bytes,
          pduIds: line.pdus, eduTypes: line.edus.map((e) => e.edu_type), outcome: null, done: null,
        };
        d.sent += 1;
        d.inFlight = attempt;
        d.attempts.push(attempt);
        if (d.attempts.length > ATTEMPTS_KEPT) d.attempts.shift();
        attempt.dest = line.dest;
        this.flights.push(attempt);
        if (this.flights.length > 6000) this.flights = this.flights.slice(-3000);
        break;
      }
      case 'result': {
        const d = this.destination(line.dest);
        const ok = line.outcome.startsWith('ok');
        const attempt = d.inFlight?.txnId === line.txn_id ? d.inFlight : null;
        if (ok) {
          this.counts.ok += 1;
          d.ok += 1;
          if (attempt) {
            d.delivered += attempt.pdus;
            d.edusDelivered += attempt.edus;
            this.counts.pdus += attempt.pdus;
            this.counts.edus += attempt.edus;
            for (const kind of attempt.eduTypes) {
              d.eduKinds.set(kind, (d.eduKinds.get(kind) ?? 0) + 1);
              this.eduKinds.set(kind, (this.eduKinds.get(kind) ?? 0) + 1);
            }
            for (const id of attempt.pduIds) {
              const e = this.events.get(id);
              if (!e) continue;
              if ((d.received.get(e.room) ?? 0) < e.stream) d.received.set(e.room, e.stream);
              d.lastReceived = id;
            }
          }
        } else {
          this.counts.failed += 1;
          d.failed += 1;
        }
        if (attempt) {
          attempt.outcome = line.outcome;
          attempt.done = line.t;
          delete attempt.pduIds;
          d.inFlight = null;
        }
        break;
      }
      case 'dropped':
        this.counts.dropped += 1;
        this.destination(line.dest).dropped += 1;
        break;
      case 'snapshot':
        this.counts.snapshot += 1;
        this.snapshot = line;
        break;
      case 'end':
        this.counts.end += 1;
        break;
      default:
        break;
    }
    if (line.kind === 'persisted') {
      // Our own events are owed to the room's servers, except a room's first event (its
      // creation, which has no predecessor and is never sent).
      const e = this.events.get(line.event);
      if (!this.roomStarted.has(e.room)) {
        this.roomStarted.add(e.room);
      } else if (e.local) {
        if (!this.roomEvents.has(e.room)) this.roomEvents.set(e.room, []);
        this.roomEvents.get(e.room).push({ stream: e.stream, t: e.t });
      }
    }
  }

  /** Takes the core's figures (JSON text of a DestinationStats array) at virtual time `now`. */
  setStats(statsJson, now) {
    this.now = now;
    const seen = new Set();
    for (const s of JSON.parse(statsJson)) {
      const d = this.destination(s.destination);
      seen.add(d);
      const previousUntil = d.stats?.backoff_until_ts ?? null;
      d.stats = s;
      d.state = s.state;
      if (!s.in_flight && d.inFlight) {
        // Its answer went to a process that no longer exists (a restart).
        d.inFlight.outcome ??= 'lost';
        d.inFlight = null;
      }
      if (s.backoff_until_ts !== null && s.backoff_until_ts !== previousUntil) {
        d.backoffs.push({ t: now, until: s.backoff_until_ts, interval: s.retry_interval_ms });
        if (d.backoffs.length > HISTORY_KEPT) d.backoffs.shift();
      }
    }
    // The core forgets idle destinations it has nothing for (or after a restart).
    for (const d of this.dests.values()) {
      if (!seen.has(d)) {
        d.stats = null;
        d.state = 'idle';
        d.inFlight = null;
      }
    }
  }

  /** Our own events sent in `room` after `stream`: what `room` still owes a destination. */
  owedAfter(room, stream) {
    const list = this.roomEvents.get(room);
    if (!list || list.length === 0) return null;
    if (list[list.length - 1].stream <= stream) return null;
    let lo = 0;
    let hi = list.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (list[mid].stream > stream) hi = mid;
      else lo = mid + 1;
    }
    return list[lo];
  }

  /** Whether `d` has received the newest of our events in each of its rooms, and since when it
   * lags (virtual ms; 0 when converged). */
  progress(d) {
    let oldest = null;
    let behind = 0;
    for (const room of d.rooms) {
      const owed = this.owedAfter(room, d.received.get(room) ?? 0);
      if (owed) {
        behind += 1;
        if (oldest === null || owed.t < oldest) oldest = owed.t;
      }
    }
    return { converged: behind === 0, roomsBehind: behind, lagMs: oldest === null ? 0 : this.now - oldest };
  }

  /** Totals over every destination. */
  totals() {
    const states = { idle: 0, sending: 0, retrying: 0, backing_off: 0, catching_up: 0, gone: 0 };
    let queued = 0;
    let inFlight = 0;
    let converged = 0;
    let lagMax = 0;
    for (const d of this.dests.values()) {
      states[d.state] = (states[d.state] ?? 0) + 1;
      queued += d.stats?.queued_pdus ?? 0;
      if (d.stats?.in_flight) inFlight += 1;
      const p = this.progress(d);
      d.progress = p; // for the drawing, until the next call
      if (p.converged) converged += 1;
      lagMax = Math.max(lagMax, p.lagMs);
    }
    return {
      states, queued, inFlight, converged, total: this.dests.size, delivered: this.counts.pdus, edus: this.counts.edus, lagMax,
    };
  }

  /** Records one point of the charts (call once per virtual second or so). */
  sample() {
    const t = this.totals();
    this.samples.push({ t: this.now, delivered: t.delivered, queued: t.queued, inFlight: t.inFlight });
    if (this.samples.length > 900) this.samples.shift();
    return t;
  }
}

// ----- the live run: ticks, workload, actions -----

/**
 * A live run: the wasm `LiveSimulation` plus the seeded workload and the user's actions.
 * `LiveSimulation` is the class from whichever wasm-bindgen build the caller loaded.
 */
export class LiveRun {
  /** `schedule`: actions to apply at given ticks, [{ tick, action }] (a recorded `log`).
   * `fold: false` leaves the trace and the figures to the caller (`sim.takeTrace()`, as the
   * Web Worker does, whose page folds them), the header's trace included. */
  constructor(LiveSimulation, params, schedule = [], { fold = true } = {}) {
    this.params = { ...DEFAULT_PARAMS, ...params };
    this.world = buildWorld(this.params);
    this.random = prng(fnv(0x811c9dc5, `workload:${this.params.seed}`));
    // The newer mixes draw from streams of their own (see MIXES).
    this.mixRandom = {
      presence: prng(fnv(0x811c9dc5, `presence:${this.params.seed}`)),
      todevice: prng(fnv(0x811c9dc5, `todevice:${this.params.seed}`)),
      devices: prng(fnv(0x811c9dc5, `devices:${this.params.seed}`)),
    };
    this.mixCarry = { presence: 0, todevice: 0, devices: 0 };
    this.presenceIndex = 0; // position in PRESENCE_CYCLE
    this.nextMessage = 1; // to-device message ids
    this.devices = new Map(); // our user's device id → times its keys changed
    this.signingKeys = 0; // cross-signing key changes so far
    this.roomServers = new Map(this.world.roomIds.map((room) => [
      room, this.world.names.filter((name) => this.world.roomsOf.get(name).includes(room)),
    ]));
    this.sim = new LiveSimulation(JSON.stringify(this.world.header));
    this.model = new Model({ names: this.world.names, roomsOf: this.world.roomsOf });
    this.tick = 0;
    this.nextEvent = 1;
    this.carry = 0; // fractional events owed by the workload
    this.carryEdus = 0; // fractional EDUs owed by the workload
    this.newest = new Map(); // room → id of our newest event in it (for receipts)
    this.typing = new Set(); // rooms where our user is typing
    this.pending = []; // actions waiting for the next tick
    this.log = []; // [{ tick, action }] applied, for replaying a run
    this.schedule = [...schedule].sort((a, b) => a.tick - b.tick);
    this.down = new Set();
    this.flaky = new Set();
    this.limited = new Set();
    this.partitioned = false;
    this.restartedAt = null;
    this.lastSample = -Infinity;
    if (fold) this.sync();
  }

  free() {
    this.sim.free();
  }

  get now() {
    return this.sim.nowMs();
  }

  /** Queues an action for the next tick: { op: 'down'|'up'|'flaky'|'ratelimit'|'poison'|'inbound', host }
   * or { op: 'partition'|'heal'|'restart' } or { op: 'rate'|'edus'|'presence'|'todevice'|'devices', value }
   * (events or EDUs per second). */
  act(action) {
    this.pending.push(action);
  }

  respondOf(host) {
    if (this.down.has(host) || (this.partitioned && this.world.names.indexOf(host) >= this.world.names.length / 2)) {
      return 'unreachable';
    }
    if (this.limited.has(host)) return { status: 429, retry_after_ms: 15_000, errcode: 'M_LIMIT_EXCEEDED' };
    return 'ok';
  }

  remoteStep(host, respond = this.respondOf(host)) {
    return { op: 'remote', host, respond, latency_ms: this.world.latency.get(host) ?? 0 };
  }

  sendStep(room, id) {
    return { op: 'send', room, sender: LOCAL_USER, id, content: { msgtype: 'm.text', body: `event ${id}` } };
  }

  actionSteps(action) {
    const { op, host } = action;
    const steps = [];
    switch (op) {
      case 'down':
        this.down.add(host);
        this.flaky.delete(host);
        steps.push(this.remoteStep(host));
        break;
      case 'up':
        this.down.delete(host);
        this.flaky.delete(host);
        this.limited.delete(host);
        steps.push(this.remoteStep(host));
        break;
      case 'flaky':
        this.flaky.add(host);
        break;
      case 'ratelimit':
        this.limited.add(host);
        this.flaky.delete(host);
        steps.push(this.remoteStep(host));
        break;
      case 'poison': {
        const room = this.world.roomsOf.get(host)?.[0] ?? this.world.roomIds[0];
        const id = `$poison${this.nextEvent}`;
        this.nextEvent += 1;
        steps.push({ op: 'reject', host, pdus: [id], status: 400 });
        steps.push(this.sendStep(room, id));
        break;
      }
      case 'inbound':
        steps.push({ op: 'inbound', host });
        break;
      case 'partition':
      case 'heal':
        this.partitioned = op === 'partition';
        for (const name of this.world.names.slice(Math.ceil(this.world.names.length / 2))) {
          if (!this.flaky.has(name)) steps.push(this.remoteStep(name));
        }
        break;
      case 'restart':
        this.restartedAt = this.now;
        steps.push({ op: 'restart' });
        break;
      case 'rate':
        this.params.rate = Math.max(0, Number(action.value) || 0);
        break;
      case 'edus':
      case 'presence':
      case 'todevice':
      case 'devices':
        this.params[op] = Math.max(0, Number(action.value) || 0);
        break;
      default:
        throw new Error(`unknown action ${JSON.stringify(action)}`);
    }
    return steps;
  }

  /** The steps of one tick: actions, flaky flips, workload, then `advance`. */
  tickSteps() {
    const steps = [];
    const due = [];
    while (this.schedule.length && this.schedule[0].tick <= this.tick) due.push(this.schedule.shift().action);
    due.push(...this.pending.splice(0));
    for (const action of due) {
      this.log.push({ tick: this.tick, action });
      steps.push(...this.actionSteps(action));
    }
    for (const host of this.flaky) {
      if (this.down.has(host)) continue;
      if (this.random() < 0.25) {
        steps.push(this.remoteStep(host, this.random() < 0.5 ? 'ok' : { status: 503 }));
      }
    }
    this.carry += (this.params.rate * TICK_MS) / 1000;
    while (this.carry >= 1 || (this.carry > 0 && this.random() < this.carry)) {
      this.carry = Math.max(0, this.carry - 1);
      const room = this.world.roomIds[Math.floor(this.random() * this.world.roomIds.length)];
      const id = `$e${this.nextEvent}`;
      steps.push(this.sendStep(room, id));
      this.newest.set(room, id);
      this.nextEvent += 1;
    }
    // The EDU mix: our user starts or stops typing, or sends a read receipt for our newest
    // event in the room.
    this.carryEdus += (this.params.edus * TICK_MS) / 1000;
    while (this.carryEdus >= 1 || (this.carryEdus > 0 && this.random() < this.carryEdus)) {
      this.carryEdus = Math.max(0, this.carryEdus - 1);
      const room = this.world.roomIds[Math.floor(this.random() * this.world.roomIds.length)];
      const event = this.newest.get(room);
      if (event && this.random() < 0.5) {
        const ts = START_MS + this.tick * TICK_MS;
        steps.push({ op: 'receipt', room, user: LOCAL_USER, event, ts });
      } else {
        const typing = !this.typing.has(room);
        if (typing) this.typing.add(room);
        else this.typing.delete(room);
        steps.push({ op: 'typing', room, user: LOCAL_USER, typing, timeout_ms: 30_000 });
      }
    }
    this.mixSteps(steps);
    steps.push({ op: 'advance', ms: TICK_MS });
    this.tick += 1;
    return steps;
  }

  /** How many items of mix `kind` fall due this tick (its rate, carried over between ticks). */
  due(kind) {
    const random = this.mixRandom[kind];
    this.mixCarry[kind] += (this.params[kind] * TICK_MS) / 1000;
    let n = 0;
    while (this.mixCarry[kind] >= 1 || (this.mixCarry[kind] > 0 && random() < this.mixCarry[kind])) {
      this.mixCarry[kind] = Math.max(0, this.mixCarry[kind] - 1);
      n += 1;
    }
    return n;
  }

  /** The presence, to-device and device-list mixes of one tick, appended to `steps`. */
  mixSteps(steps) {
    const now = START_MS + this.tick * TICK_MS;
    const names = this.world.names;
    for (let n = this.due('presence'); n > 0; n -= 1) {
      // Our user's presence goes to the servers of one room at a time, so that one update
      // fans out like a typing notification rather than to the whole federation.
      const random = this.mixRandom.presence;
      const room = this.world.roomIds[Math.floor(random() * this.world.roomIds.length)];
      const destinations = this.roomServers.get(room);
      this.presenceIndex = (this.presenceIndex + 1) % PRESENCE_CYCLE.length;
      const presence = PRESENCE_CYCLE[this.presenceIndex];
      if (destinations.length === 0) continue;
      steps.push({ op: 'presence', user: LOCAL_USER, presence, last_active_ts: now, destinations });
    }
    for (let n = this.due('todevice'); n > 0; n -= 1) {
      // A message to one to three remote users' devices (a key request, say), each on its
      // own server.
      const random = this.mixRandom.todevice;
      const messages = {};
      const count = 1 + Math.floor(random() * Math.min(3, names.length));
      for (let k = 0; k < count; k += 1) {
        const name = names[Math.floor(random() * names.length)];
        messages[`@u:${name}`] = { DEVICE: { action: 'request', request_id: `r${this.nextMessage}` } };
      }
      const message_id = `td${this.nextMessage}`;
      this.nextMessage += 1;
      steps.push({ op: 'to_device', sender: LOCAL_USER, type: 'm.room_key_request', messages, message_id });
    }
    for (let n = this.due('devices'); n > 0; n -= 1) {
      // Our user adds a device, changes its keys or deletes it; now and then their
      // cross-signing keys change. Every server sharing a room with them hears of it.
      const random = this.mixRandom.devices;
      if (random() < 0.2) {
        this.signingKeys += 1;
        const version = this.signingKeys;
        steps.push({
          op: 'signing_key_update',
          user: LOCAL_USER,
          master_key: { user_id: LOCAL_USER, usage: ['master'], keys: { [`ed25519:master${version}`]: `mk${version}` } },
          self_signing_key: { user_id: LOCAL_USER, usage: ['self_signing'], keys: { [`ed25519:self${version}`]: `sk${version}` } },
        });
        continue;
      }
      const device = LOCAL_DEVICES[Math.floor(random() * LOCAL_DEVICES.length)];
      if (this.devices.has(device) && random() < 0.3) {
        this.devices.delete(device);
        steps.push({ op: 'device_update', user: LOCAL_USER, device, deleted: true });
        continue;
      }
      const version = (this.devices.get(device) ?? 0) + 1;
      this.devices.set(device, version);
      steps.push({
        op: 'device_update',
        user: LOCAL_USER,
        device,
        keys: {
          user_id: LOCAL_USER,
          device_id: device,
          algorithms: ['m.olm.v1.curve25519-aes-sha2', 'm.megolm.v1.aes-sha2'],
          keys: { [`curve25519:${device}`]: `ck${version}`, [`ed25519:${device}`]: `ek${version}` },
        },
      });
    }
  }

  /** Runs `ticks` ticks in one call into wasm, then folds the trace and figures. */
  run(ticks = 1) {
    this.advance(ticks);
    this.sync();
  }

  /** Runs `ticks` ticks in one call into wasm, without folding (call `sync` afterwards). */
  advance(ticks) {
    if (ticks <= 0) return;
    const lines = [];
    for (let i = 0; i < ticks; i += 1) for (const step of this.tickSteps()) lines.push(JSON.stringify(step));
    this.sim.applyLines(lines.join('\n'));
  }

  /** Folds the trace written since the last call and the core's current figures. */
  sync() {
    this.model.addTraceText(this.sim.takeTrace());
    this.model.setStats(this.sim.destinationStats(), this.sim.nowMs());
    if (this.model.now - this.lastSample >= 1000) {
      this.lastSample = this.model.now;
      this.model.sample();
    }
  }
}

/**
 * A scenario file stepped through (`ScenarioStepper`, the native engine in wasm), folded into
 * the same `Model` as a live run. `known` seeds the destinations (remoteServers of trace.mjs),
 * `roomsOf` their rooms (for "converged").
 */
export class ScenarioReplay {
  constructor(ScenarioStepper, scenarioText, known = [], roomsOf = new Map()) {
    this.stepper = new ScenarioStepper(scenarioText);
    const scenario = JSON.parse(scenarioText);
    this.model = new Model({ names: known, roomsOf, startMs: scenario.start_ms ?? START_MS });
    this.lines = [];
    this.done = false;
    this.sync();
  }

  free() {
    this.stepper.free();
  }

  get stepCount() {
    return this.stepper.stepCount();
  }

  get nextStep() {
    return this.stepper.nextStep();
  }

  /** Runs the next step; false once the `end` line is written. */
  step() {
    if (this.done) return false;
    const more = this.stepper.step();
    this.done = !more;
    this.sync();
    return more;
  }

  sync() {
    const text = this.stepper.takeTrace();
    if (text) this.lines.push(...text.split('\n'));
    this.model.addTraceText(text);
    this.model.setStats(this.stepper.destinationStats(), this.stepper.nowMs());
    this.model.sample();
  }
}

/** Counts of a trace (lines as text), the way the page shows them for a replay. */
export function traceCounts(lines) {
  const counts = { lines: 0, persisted: 0, send: 0, ok: 0, failed: 0, dropped: 0, snapshot: 0, end: 0 };
  for (const text of lines) {
    if (!text.trim()) continue;
    const line = JSON.parse(text);
    counts.lines += 1;
    if (line.kind === 'result') counts[line.outcome.startsWith('ok') ? 'ok' : 'failed'] += 1;
    else if (line.kind in counts) counts[line.kind] += 1;
  }
  return counts;
}

/** An action log as text for a URL: `TICK:op[:host or value]`, comma-separated. */
export function encodeLog(log) {
  return log.map(({ tick, action }) => [tick, action.op, action.host ?? action.value].filter((x) => x !== undefined).join(':')).join(',');
}

/** The inverse of `encodeLog`; throws on a malformed entry. */
export function decodeLog(text) {
  if (!text) return [];
  return text.split(',').map((entry) => {
    const [tick, op, ...rest] = entry.split(':');
    const arg = rest.join(':');
    if (!/^\d+$/.test(tick) || !op) throw new Error(`bad action log entry ${JSON.stringify(entry)}`);
    const action = { op };
    if (VALUE_OPS.has(op)) action.value = Number(arg);
    else if (arg) action.host = arg;
    return { tick: Number(tick), action };
  });
}
