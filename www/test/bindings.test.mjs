// The JavaScript API of the Node build (host-wasm/pkg/node: scripts/build-wasm.sh):
// FederationSender and runScenario, including how errors cross the boundary.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { senderEngine } from '../lib/engine.mjs';

const { FederationSender, runScenario } = createRequire(import.meta.url)(
  fileURLToPath(new URL('../../host-wasm/pkg/node/fedsend_wasm.js', import.meta.url)));

const TINY = JSON.stringify({
  server_name: 'test',
  steps: [
    { op: 'create_room', room: '!r:test', creator: '@a:test' },
    { op: 'join', room: '!r:test', user: '@b:host2' },
    { op: 'send', room: '!r:test', sender: '@a:test', content: { msgtype: 'm.text', body: 'hi' } },
    { op: 'advance', ms: 1000 },
  ],
});

/** Runs TINY with `engine`; returns the trace lines. */
function trace(engine, scenario = TINY) {
  const lines = [];
  runScenario(scenario, engine, (line) => lines.push(line));
  return lines;
}

/** A FederationSender built with the configuration the simulator itself uses. */
function realSender() {
  let args;
  const inner = senderEngine(FederationSender);
  trace({ ...inner, start: (c, r) => { args ??= [c, r]; inner.start(c, r); } });
  inner.free();
  return new FederationSender(...args);
}

test('runScenario drives a FederationSender through a JS engine object', () => {
  const engine = senderEngine(FederationSender);
  const lines = trace(engine);
  engine.free();
  assert.ok(lines.length > 0);
  assert.equal(JSON.parse(lines.at(-1)).kind, 'end');
});

test('the engine sees only whole, safe millisecond times', () => {
  const inner = senderEngine(FederationSender);
  const times = [];
  trace({
    ...inner,
    handleInput(nowMs, input) { times.push(nowMs); inner.handleInput(nowMs, input); },
    pollTimeout() {
      const t = inner.pollTimeout();
      assert.ok(t === undefined || Number.isSafeInteger(t), `pollTimeout ${t}`);
      return t;
    },
  });
  inner.free();
  for (const t of times) assert.ok(Number.isSafeInteger(t) && t >= 0, `nowMs ${t}`);
});

test('handleInput refuses times that are not whole safe milliseconds, with an Error', () => {
  const sender = realSender();
  for (const bad of [-1, 1.5, NaN, Infinity, 2 ** 53]) {
    assert.throws(() => sender.handleInput(bad, '{}'), (e) => e instanceof Error && /^nowMs must be a whole number/.test(e.message),
      `nowMs ${bad}`);
  }
  sender.free();
});

test('a bad input throws an Error and the machine keeps running', () => {
  const sender = realSender();
  assert.throws(() => sender.handleInput(1_000_000, 'not json'), Error);
  assert.throws(() => sender.handleInput(1_000_000, '{"type":"no_such_input"}'), Error);
  const deadline = sender.pollTimeout();
  assert.ok(deadline === undefined || Number.isSafeInteger(deadline));
  const output = sender.pollOutput();
  assert.ok(output === undefined || typeof output === 'string');
  sender.free();
});

test('a bad configuration throws an Error with a message', () => {
  assert.throws(() => new FederationSender('not json', '{}'), (e) => e instanceof Error && e.message.length > 0);
  assert.throws(() => new FederationSender('{"no_such_setting": 1}', '{}'), (e) => e instanceof Error && e.message.length > 0);
});

test('runScenario checks its arguments', () => {
  const engine = senderEngine(FederationSender);
  assert.throws(() => runScenario(TINY, engine, 'not a function'), { message: /^emit must be a function/ });
  const { pollTimeout, ...partial } = engine;
  assert.throws(() => runScenario(TINY, partial, () => {}), { message: /^engine\.pollTimeout must be a function/ });
});

test('an exception from engine.start ends the run with its message', () => {
  const engine = { ...senderEngine(FederationSender), start() { throw new Error('no machine today'); } };
  assert.throws(() => trace(engine), (e) => e instanceof Error && e.message.includes('no machine today') && !e.message.includes('\n'));
});

test('exceptions and bad values from the poll methods and emit are not lost', () => {
  const cases = [
    [{ pollOutput() { throw new TypeError('poll broke'); } }, /engine\.pollOutput threw: TypeError: poll broke/],
    [{ pollOutput() { return 42; } }, /engine\.pollOutput returned .*not a string/],
    [{ pollTimeout() { return -5; } }, /engine\.pollTimeout returned a bad deadline/],
    [{ pollTimeout() { return '1000'; } }, /engine\.pollTimeout returned a bad deadline/],
  ];
  for (const [override, message] of cases) {
    const engine = { ...senderEngine(FederationSender), ...override };
    assert.throws(() => trace(engine), { message }, String(message));
    engine.free();
  }
  const engine = senderEngine(FederationSender);
  assert.throws(() => runScenario(TINY, engine, () => { throw new Error('disk full'); }), { message: /emit threw: disk full/ });
  engine.free();
});
