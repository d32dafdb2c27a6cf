// lib/trace.mjs: how the demo reads scenarios and traces.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { foldTrace, remoteServers, serverOf } from '../lib/trace.mjs';

test('serverOf', () => {
  assert.equal(serverOf('@a:host.example'), 'host.example');
  assert.equal(serverOf('@a:host.example:8448'), 'host.example:8448');
  assert.equal(serverOf('!room:host'), undefined);
  assert.equal(serverOf(undefined), undefined);
});

test('the demo scenario has eight remote servers', () => {
  const demo = JSON.parse(readFileSync(new URL('../scenarios/demo.json', import.meta.url), 'utf8'));
  assert.deepEqual(remoteServers(demo), [
    'amber.example', 'birch.example', 'cedar.example', 'dogwood.example',
    'elm.example', 'fir.example', 'ginkgo.example', 'hazel.example',
  ]);
});

const LINES = [
  { t: 1, kind: 'persisted', event: '$1', room: '!r:test', stream: 1, sender: '@a:test' },
  { t: 1, kind: 'send', dest: 'b', txn_id: 'x1', pdus: ['$1'], edus: [], bytes: 100 },
  { t: 1, kind: 'send', dest: 'c', txn_id: 'y1', pdus: ['$1'], edus: [{ edu_type: 'm.typing', content: {} }], bytes: 150 },
  { t: 2, kind: 'result', dest: 'b', txn_id: 'x1', outcome: 'ok' },
  { t: 2, kind: 'result', dest: 'c', txn_id: 'y1', outcome: 'unreachable' },
  { t: 5, kind: 'send', dest: 'c', txn_id: 'y1', pdus: ['$1'], edus: [{ edu_type: 'm.typing', content: {} }], bytes: 150 },
  { t: 6, kind: 'snapshot', destinations: [
    { destination: 'c', retry_last_ts: 2, retry_interval: 600000, failure_ts: 2, last_successful_stream_ordering: null },
  ], destination_rooms: [], events_out_pos: 1 },
  { t: 7, kind: 'result', dest: 'c', txn_id: 'y1', outcome: 'ok' },
  { t: 7, kind: 'end' },
];

test('foldTrace counts per destination and derives the state', () => {
  const byName = (r) => Object.fromEntries(r.destinations.map((d) => [d.destination, d]));
  const all = byName(foldTrace(LINES, { known: ['a', 'b'] }));
  assert.deepEqual(Object.keys(all), ['a', 'b', 'c']);
  assert.equal(all.a.sent, 0);
  assert.equal(all.a.state, 'idle');
  assert.deepEqual([all.b.sent, all.b.ok, all.b.failed, all.b.state], [1, 1, 0, 'idle']);
  assert.deepEqual([all.c.sent, all.c.ok, all.c.failed, all.c.state, all.c.pdus, all.c.edus], [2, 1, 1, 'idle', 1, 1]);
  assert.equal(all.c.lastTxn.outcome, 'ok');
  assert.equal(all.c.backoff.retry_interval, 600000);

  assert.equal(byName(foldTrace(LINES, { count: 2 })).b.state, 'sending');
  assert.equal(byName(foldTrace(LINES, { count: 5 })).c.state, 'failing');
  assert.equal(byName(foldTrace(LINES, { count: 6 })).c.state, 'sending');
  assert.equal(foldTrace(LINES, { count: 6 }).t, 5);
});
