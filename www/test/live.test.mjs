// lib/live.mjs: the visualiser's live run and scenario replay, driven in Node through the
// wasm-bindgen build (needs host-wasm/pkg/node: scripts/build-wasm.sh).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { LiveRun, ScenarioReplay, backoffBoundMs, buildWorld, decodeLog, encodeLog, prng, traceCounts } from '../lib/live.mjs';
import { remoteServers } from '../lib/trace.mjs';

const require = createRequire(import.meta.url);
const { LiveSimulation, ScenarioStepper } = require('../../host-wasm/pkg/node/fedsend_wasm.js');
const SCENARIOS = fileURLToPath(new URL('../../tests/scenarios/', import.meta.url));

test('prng is seeded and in [0, 1)', () => {
  const a = prng(42);
  const b = prng(42);
  const xs = Array.from({ length: 100 }, () => a());
  assert.deepEqual(xs, Array.from({ length: 100 }, () => b()));
  assert.ok(xs.every((x) => x >= 0 && x < 1));
  assert.notDeepEqual(xs.slice(0, 5), Array.from({ length: 5 }, prng(43)));
});

test('the world: every destination shares a room and answers', () => {
  const world = buildWorld({ seed: 3, destinations: 50, rooms: 4 });
  assert.equal(world.names.length, 50);
  for (const name of world.names) assert.ok(world.roomsOf.get(name).length >= 1);
  assert.equal(world.header.steps.filter((s) => s.op === 'remote').length, 50);
});

test('same seed and actions, same run; another seed, another run', () => {
  const go = (seed) => {
    const run = new LiveRun(LiveSimulation, { seed, destinations: 20, rooms: 3, rate: 3 });
    try {
      run.run(50);
      run.act({ op: 'down', host: 's0002.example' });
      run.act({ op: 'flaky', host: 's0005.example' });
      run.run(200);
      run.act({ op: 'restart' });
      run.run(100);
      return run.model.digest;
    } finally {
      run.free();
    }
  };
  assert.equal(go(9), go(9));
  assert.notEqual(go(9), go(10));
});

test('the action log, encoded for the URL, replays the run', () => {
  const live = new LiveRun(LiveSimulation, { seed: 4, destinations: 15, rooms: 2, rate: 3 });
  live.run(30);
  live.act({ op: 'down', host: 's0007.example' });
  live.act({ op: 'rate', value: 6 });
  live.run(40);
  live.act({ op: 'restart' });
  live.act({ op: 'up', host: 's0007.example' });
  live.run(30);
  const text = encodeLog(live.log);
  assert.equal(text, '30:down:s0007.example,30:rate:6,70:restart,70:up:s0007.example');
  assert.deepEqual(decodeLog(text), live.log);
  const again = new LiveRun(LiveSimulation, { seed: 4, destinations: 15, rooms: 2, rate: 3 }, decodeLog(text));
  again.run(100);
  assert.equal(again.model.digest, live.model.digest);
  assert.throws(() => decodeLog('x:down'), /bad action log entry/);
  live.free();
  again.free();
});

test('a server taken down backs off in time; brought up, it catches up and converges', () => {
  const run = new LiveRun(LiveSimulation, { seed: 1, destinations: 30, rooms: 4, rate: 2 });
  try {
    run.run(100);
    const host = 's0003.example';
    const d = run.model.dests.get(host);
    run.act({ op: 'down', host });
    const start = run.now;
    while (d.state !== 'backing_off' && run.now - start < 120_000) run.run(1);
    assert.equal(d.state, 'backing_off');
    assert.ok(run.now - start <= backoffBoundMs(), `backed off after ${run.now - start} ms`);
    assert.ok(d.backoffs.length >= 1 && d.stats.backoff_until_ts > run.now);
    run.run(1500); // long enough to drop its queue (catch_up_threshold_ms)
    assert.equal(run.model.progress(d).converged, false);
    run.act({ op: 'up', host });
    run.act({ op: 'inbound', host });
    run.act({ op: 'rate', value: 0 });
    run.run(300);
    assert.equal(d.state, 'idle');
    assert.equal(run.model.progress(d).converged, true);
    const totals = run.model.totals();
    assert.equal(totals.converged, totals.total);
  } finally {
    run.free();
  }
});

test('restarting the sender keeps delivery converging', () => {
  const run = new LiveRun(LiveSimulation, { seed: 5, destinations: 40, rooms: 4, rate: 4 });
  try {
    run.run(100);
    run.act({ op: 'restart' });
    run.run(50);
    run.act({ op: 'rate', value: 0 });
    run.run(600);
    const totals = run.model.totals();
    assert.equal(totals.converged, totals.total, JSON.stringify(totals));
    assert.equal(totals.queued, 0);
  } finally {
    run.free();
  }
});

test('a poisoned event is dropped for its destination and the rest still arrives', () => {
  const run = new LiveRun(LiveSimulation, { seed: 2, destinations: 10, rooms: 2, rate: 1 });
  try {
    run.run(20);
    run.act({ op: 'poison', host: 's0004.example' });
    run.run(600);
    assert.ok(run.model.dests.get('s0004.example').dropped >= 1);
  } finally {
    run.free();
  }
});

for (const name of ['restart', 'long-outage-catch-up', 'd7-poison-transaction', 't-r1-send-receipts', 'd9-edus-flow-during-catch-up']) {
  test(`replaying ${name}.json step by step gives the native engine's trace`, () => {
    const text = readFileSync(`${SCENARIOS}${name}.json`, 'utf8');
    const replay = new ScenarioReplay(ScenarioStepper, text, remoteServers(JSON.parse(text)));
    try {
      let steps = 0;
      while (replay.step()) steps += 1;
      assert.equal(steps, replay.stepCount);
      const expected = readFileSync(`${SCENARIOS}${name}.trace.jsonl`, 'utf8').split('\n').filter(Boolean);
      assert.deepEqual(replay.lines, expected);
      assert.deepEqual(traceCounts(replay.lines), traceCounts(expected));
    } finally {
      replay.free();
    }
  });
}

/** EDUs by type in the transactions a run sent (from its trace), and in those delivered. */
function eduCounts(run, ticks) {
  const sent = new Map();
  for (let i = 0; i < ticks; i += 1) {
    run.advance(1);
    const text = run.sim.takeTrace();
    run.model.addTraceText(text);
    for (const line of text ? text.split('\n') : []) {
      const l = JSON.parse(line);
      if (l.kind !== 'send') continue;
      for (const edu of l.edus) sent.set(edu.edu_type, (sent.get(edu.edu_type) ?? 0) + 1);
    }
  }
  run.model.setStats(run.sim.destinationStats(), run.sim.nowMs());
  return { sent, delivered: run.model.eduKinds };
}

const MIX_TYPES = {
  edus: ['m.typing', 'm.receipt'],
  presence: ['m.presence'],
  todevice: ['m.direct_to_device'],
  devices: ['m.device_list_update', 'm.signing_key_update'],
};

test('each EDU mix delivers its EDU types when its rate is above 0, and none at 0', () => {
  const off = { edus: 0, presence: 0, todevice: 0, devices: 0 };
  const silent = new LiveRun(LiveSimulation, { seed: 6, destinations: 12, rooms: 3, rate: 1, ...off });
  try {
    const { sent } = eduCounts(silent, 600);
    assert.deepEqual([...sent.keys()], [], `EDUs sent with every mix at 0: ${JSON.stringify([...sent])}`);
  } finally {
    silent.free();
  }
  for (const [mix, types] of Object.entries(MIX_TYPES)) {
    const run = new LiveRun(LiveSimulation, { seed: 6, destinations: 12, rooms: 3, rate: 1, ...off, [mix]: 2 });
    try {
      const { sent, delivered } = eduCounts(run, 600);
      for (const type of types) {
        assert.ok((sent.get(type) ?? 0) > 0, `${mix} at 2/s sent no ${type}: ${JSON.stringify([...sent])}`);
        assert.ok((delivered.get(type) ?? 0) > 0, `${mix} at 2/s delivered no ${type}: ${JSON.stringify([...delivered])}`);
      }
      const others = Object.entries(MIX_TYPES).filter(([m]) => m !== mix).flatMap(([, t]) => t);
      for (const type of others) assert.equal(sent.get(type) ?? 0, 0, `${mix} alone sent ${type}`);
      // Per destination, what the detail panel lists.
      const kinds = new Set([...run.model.dests.values()].flatMap((d) => [...d.eduKinds.keys()]));
      for (const type of types) assert.ok(kinds.has(type), `no destination shows ${type} received`);
    } finally {
      run.free();
    }
  }
});

test('a mix rate changed mid-run is logged, replayed from the URL, and stops its EDUs at 0', () => {
  const params = { seed: 8, destinations: 10, rooms: 2, rate: 0.5, edus: 0, presence: 1, todevice: 1, devices: 1 };
  const live = new LiveRun(LiveSimulation, params);
  live.run(100);
  for (const mix of ['presence', 'todevice', 'devices']) live.act({ op: mix, value: 0 });
  live.run(100); // lets what was queued drain
  const before = new Map(live.model.eduKinds);
  const { sent } = eduCounts(live, 300);
  for (const type of ['m.presence', 'm.direct_to_device', 'm.device_list_update', 'm.signing_key_update']) {
    assert.equal(sent.get(type) ?? 0, 0, `${type} still sent after its mix went to 0`);
  }
  assert.ok((before.get('m.presence') ?? 0) > 0 && (before.get('m.device_list_update') ?? 0) > 0, JSON.stringify([...before]));
  const text = encodeLog(live.log);
  assert.equal(text, '100:presence:0,100:todevice:0,100:devices:0');
  const again = new LiveRun(LiveSimulation, params, decodeLog(text));
  again.run(500);
  assert.equal(again.model.digest, live.model.digest);
  live.free();
  again.free();
});
