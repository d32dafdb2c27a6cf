#!/usr/bin/env node
// node www/bin/live-steps.mjs [URL-QUERY] [TICKS] > FILE
//
// Writes the steps the visualiser's live run applies (lib/live.mjs: LiveRun, the same seeded
// workload as the page for the same query; default `seed=1&n=1000&rate=2`, 600 ticks = 60
// virtual seconds): the scenario header on the first line, then every step as one JSON line,
// each tick ending with its `advance`. The workload never reads the simulation back, so the
// steps do not depend on the engine, and a native program can replay the page's world
// (host-wasm/examples/live_world.rs) under a profiler or callgrind.

import { DEFAULT_PARAMS, LiveRun, START_MS, TICK_MS } from '../lib/live.mjs';

const q = new URLSearchParams(process.argv[2] ?? 'seed=1&n=1000&rate=2');
const ticks = Number(process.argv[3] ?? 600);
const num = (key, name = key) => (q.has(key) ? Number(q.get(key)) : DEFAULT_PARAMS[name]);
const params = Object.fromEntries(
  ['seed', 'rooms', 'rate', 'edus', 'presence', 'todevice', 'devices'].map((k) => [k, num(k)]),
);
params.destinations = num('n', 'destinations');

/** Stands in for the wasm `LiveSimulation`: keeps what it is given, answers nothing. */
class Recorder {
  constructor(header) {
    this.out = [header];
    this.ms = START_MS;
  }
  applyLines(text) {
    this.out.push(text);
    this.ms += TICK_MS;
  }
  takeTrace() {
    return '';
  }
  destinationStats() {
    return '[]';
  }
  nowMs() {
    return this.ms;
  }
  free() {}
}

const run = new LiveRun(Recorder, params);
for (let i = 0; i < ticks; i += 1) run.advance(1);
process.stdout.write(`${run.sim.out.join('\n')}\n`);
