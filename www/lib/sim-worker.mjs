// The live run in a Web Worker (the page's default; `?worker=0` keeps it on the page's thread): the simulated world and the core
// advance here, paced to the speed the page asks for, and the page's main thread only folds
// what they wrote and draws (lib/worker-run.mjs is the page's side). The ticks, the workload
// and the actions are LiveRun's, as on the main thread, so a run is the same run either way:
// the same trace, the same digest.
//
// Page → worker: { type: 'start', params, schedule } | { type: 'speed', speed, paused } |
//   { type: 'act', action } | { type: 'step', ticks } | { type: 'ack' } (a batch was folded)
// Worker → page: { type: 'batch', lines, digest, stats, now, log, partitioned, restartedAt, simMs, ticks }
//   | { type: 'error', message }
//
// The trace is parsed here and sent as objects, each `send` line with only the types of its
// EDUs (all the page's Model reads of them): most of the trace's bytes are EDU contents, and
// parsing them was the largest cost left on the page's thread. The digest of the trace text is
// kept here too, over the same text as on the page's thread.

import init, { LiveSimulation } from '../pkg/fedsend_wasm.js';
import { LiveRun, TICK_MS, fnv } from './live.mjs';

const SLICE_MS = 20; // simulation between two looks at the page's messages
const STATS_MS = 33; // least time between two readings of the core's figures (~300 KB of JSON at 1 000)

let run = null;
let speed = 1;
let paused = true;
let debt = 0;
let last = null;
let waiting = false; // a batch is with the page: the next waits, and the trace piles up in wasm
let statsAt = -Infinity;
let logged = 0;
let simMs = 0;
let ticks = 0;
let pending = false; // a turn of `pump` is scheduled
let digest = 0x811c9dc5; // Model's digest of the trace so far

/** A trace line as the page's Model folds it. */
function slim(text) {
  const line = JSON.parse(text);
  if (line.kind === 'send') line.edus = line.edus.map(({ edu_type }) => ({ edu_type }));
  return line;
}

// A turn without setTimeout's clamp (4 ms once nested), so that the worker runs flat out when
// it is behind and still sees the page's messages between slices.
const turn = new MessageChannel();
turn.port1.onmessage = () => pump();

function schedule(delay) {
  if (pending || paused || !run) return;
  pending = true;
  if (delay === 0) turn.port2.postMessage(null);
  else setTimeout(() => pump(), delay);
}

function pump() {
  pending = false;
  if (!run || paused) return;
  const t0 = performance.now();
  const real = last === null ? 0 : Math.min(250, t0 - last);
  last = t0;
  debt += real * speed;
  let due = Math.floor(debt / TICK_MS);
  const behind = due > 0;
  while (due > 0) {
    run.advance(1);
    ticks += 1;
    due -= 1;
    debt -= TICK_MS;
    if (performance.now() - t0 > SLICE_MS) break;
  }
  // Over budget: virtual time lags instead of piling up debt.
  if (due > 0) debt = Math.min(debt, TICK_MS);
  simMs += performance.now() - t0;
  send(false);
  // Idle until the next tick falls due at this speed.
  schedule(behind ? 0 : Math.max(1, Math.ceil((TICK_MS - debt) / speed)));
}

function send(force) {
  if (!run || (waiting && !force)) return;
  const now = performance.now();
  const trace = run.sim.takeTrace();
  const withStats = force || now - statsAt >= STATS_MS;
  if (!trace && !withStats) return;
  let lines = [];
  if (trace) {
    digest = fnv(digest, `${trace}\n`);
    lines = trace.split('\n').map(slim);
  }
  const stats = withStats ? run.sim.destinationStats() : null;
  if (withStats) statsAt = now;
  const log = run.log.slice(logged);
  logged = run.log.length;
  // The partition as it will be once the queued actions apply, so that the page's button does
  // not flip back while they wait for the next tick.
  let partitioned = run.partitioned;
  for (const { op } of run.pending) if (op === 'partition' || op === 'heal') partitioned = op === 'partition';
  waiting = true;
  postMessage({ type: 'batch', lines, digest, stats, now: run.now, log, partitioned, restartedAt: run.restartedAt, simMs, ticks });
}

function handle(message) {
  switch (message.type) {
    case 'start':
      run?.free();
      run = new LiveRun(LiveSimulation, message.params, message.schedule, { fold: false });
      debt = 0;
      last = null;
      logged = 0;
      waiting = false;
      statsAt = -Infinity;
      digest = 0x811c9dc5;
      send(true);
      break;
    case 'speed':
      paused = message.paused;
      speed = message.speed;
      last = null;
      schedule(0);
      break;
    case 'act':
      run?.act(message.action);
      break;
    case 'step':
      run?.advance(message.ticks);
      send(true);
      break;
    case 'ack':
      waiting = false;
      if (paused) send(false);
      break;
    default:
      throw new Error(`unknown message ${JSON.stringify(message)}`);
  }
}

const ready = init();
self.onmessage = async (e) => {
  await ready;
  try {
    handle(e.data);
  } catch (err) {
    // The world refused a step (or the engine failed): the page stops and says so.
    paused = true;
    postMessage({ type: 'error', message: err instanceof Error ? err.message : String(err) });
  }
};
