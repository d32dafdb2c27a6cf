// Reading scenarios and traces (spec: scenarios.md) for display. Pure functions, no DOM, so
// that node --test covers them.

/** The server part of a Matrix user id (`@local:server` → `server`), or undefined. */
export function serverOf(userId) {
  if (typeof userId !== 'string' || !userId.startsWith('@')) return undefined;
  const colon = userId.indexOf(':');
  return colon > 1 ? userId.slice(colon + 1) : undefined;
}

/**
 * Every remote server a scenario mentions (users' servers and hosts), sorted: the
 * destinations the demo draws before any transaction has left.
 */
export function remoteServers(scenario) {
  const servers = new Set();
  const add = (name) => {
    if (typeof name === 'string' && name !== '' && name !== scenario.server_name) servers.add(name);
  };
  for (const step of scenario.steps ?? []) {
    for (const key of ['user', 'sender', 'creator', 'by']) add(serverOf(step[key]));
    for (const key of ['host', 'destination']) add(step[key]);
    for (const key of ['destinations', 'servers']) if (Array.isArray(step[key])) step[key].forEach(add);
  }
  return [...servers].sort();
}

function blank(destination) {
  return {
    destination,
    state: 'idle', // idle | sending | failing
    sent: 0, // `send` lines: attempts, retries of a frozen transaction included
    ok: 0,
    failed: 0,
    dropped: 0,
    pdus: 0, // PDUs and EDUs in transactions that succeeded
    edus: 0,
    inFlight: null, // txn_id of the attempt awaiting its result
    lastTxn: null, // { txnId, t, pdus, edus, bytes, outcome }
    lastError: null, // { t, outcome }
    backoff: null, // last snapshot row: { retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering }
  };
}

/**
 * Folds trace lines (parsed objects) into the state of each destination. `known` seeds the
 * map (so that servers never sent to still appear); `count` limits the fold to the first
 * `count` lines (the demo's time slider).
 */
export function foldTrace(lines, { known = [], count = lines.length } = {}) {
  const dests = new Map(known.map((name) => [name, blank(name)]));
  const dest = (name) => {
    if (!dests.has(name)) dests.set(name, blank(name));
    return dests.get(name);
  };
  let t = null;
  let eventsOutPos = null;
  for (const line of lines.slice(0, count)) {
    t = line.t ?? t;
    switch (line.kind) {
      case 'send': {
        const d = dest(line.dest);
        d.sent += 1;
        d.inFlight = line.txn_id;
        d.lastTxn = {
          txnId: line.txn_id, t: line.t, pdus: line.pdus?.length ?? 0, edus: line.edus?.length ?? 0,
          bytes: line.bytes, outcome: null,
        };
        break;
      }
      case 'result': {
        const d = dest(line.dest);
        const ok = typeof line.outcome === 'string' && line.outcome.startsWith('ok');
        const txn = d.lastTxn?.txnId === line.txn_id ? d.lastTxn : null;
        if (ok) {
          d.ok += 1;
          d.pdus += txn?.pdus ?? 0;
          d.edus += txn?.edus ?? 0;
        } else {
          d.failed += 1;
          d.lastError = { t: line.t, outcome: line.outcome };
        }
        d.failing = !ok;
        if (d.inFlight === line.txn_id) d.inFlight = null;
        if (txn) txn.outcome = line.outcome;
        break;
      }
      case 'dropped':
        dest(line.dest).dropped += 1;
        break;
      case 'snapshot':
        for (const row of line.destinations ?? []) {
          const { destination, ...backoff } = row;
          dest(destination).backoff = backoff;
        }
        eventsOutPos = line.events_out_pos ?? eventsOutPos;
        break;
      default:
        break; // persisted, end, x-…: nothing per destination
    }
  }
  for (const d of dests.values()) {
    d.state = d.inFlight !== null ? 'sending' : d.failing ? 'failing' : 'idle';
    delete d.failing;
  }
  const destinations = [...dests.values()].sort((a, b) => (a.destination < b.destination ? -1 : 1));
  return { t, eventsOutPos, destinations };
}
