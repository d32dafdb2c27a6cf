// The raw machine and the transport mapping, directly; and the browser entry's init.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { fedsend } from './helpers.mjs';

const { Machine, InputError, CallbackError, toTransactionResult } = fedsend;
const NOW = 1_700_000_000_000;

test('the raw machine: start-up outputs, a refused input changes nothing, stats', () => {
  const m = new Machine({ server_name: 'a.test' }, { incarnation: 4, events_out_pos: 10 });
  m.handleInput(NOW, { type: 'timeout' });
  const outputs = [];
  for (let o; (o = m.pollOutput()) !== undefined; ) outputs.push(o);
  assert.deepEqual(outputs, [
    { type: 'persist', request: 1, changes: { incarnation: 5 } },
    { type: 'fetch_events', request: 2, after: 10, limit: 100 },
    { type: 'load_outstanding', request: 3, after: null, limit: 25 },
  ]);
  assert.throws(() => m.handleInput(NOW, { type: 'persisted', request: 99 }), (e) => e instanceof InputError && /unknown request id 99/.test(e.message));
  assert.throws(() => m.handleInput(NOW + 0.5, { type: 'timeout' }), (e) => e instanceof InputError && /nowMs must be a whole number/.test(e.message));
  assert.throws(() => m.handleInput(NOW, [1]), (e) => e instanceof InputError && /input must be a plain object/.test(e.message));
  assert.equal(m.pollOutput(), undefined, 'refusals produced nothing');
  m.handleInput(NOW, { type: 'persisted', request: 1 }); // the new incarnation is durable: sending may start
  m.handleInput(NOW, '{"type":"edu","destination":"b.test","edu_type":"m.x","content":{}}');
  assert.match(m.pollOutputJson(), /^\{"type":"send_transaction","request":4,"destination":"b.test","txn_id":"5\.1"/);
  assert.deepEqual(m.destinationStats().map((s) => [s.destination, s.state, s.in_flight]), [['b.test', 'sending', true]]);
  m.free();
  m.free();
  assert.throws(() => m.pollOutput(), /freed/);
});

test('transport answers map to TransactionResult as the core defines it', () => {
  assert.deepEqual(toTransactionResult({ status: 200, body: '{"pdus":{"$a":{},"$b":{"error":"nope"}}}' }), { outcome: 'ok', pdu_errors: { $b: 'nope' } });
  assert.deepEqual(toTransactionResult({ status: 204 }), { outcome: 'ok' });
  assert.deepEqual(toTransactionResult({ status: 200, body: 'not json' }), { outcome: 'ok' });
  assert.deepEqual(toTransactionResult({ status: 200, body: new TextEncoder().encode('{"pdus":{"$a":{"error":"x"}}}') }), { outcome: 'ok', pdu_errors: { $a: 'x' } });
  assert.deepEqual(toTransactionResult({ status: 429, body: { errcode: 'M_LIMIT_EXCEEDED', retry_after_ms: 2000 } }), { outcome: 'status', status: 429, retry_after_ms: 2000, errcode: 'M_LIMIT_EXCEEDED' });
  assert.deepEqual(toTransactionResult({ status: 503, body: {}, retryAfterMs: 7000 }), { outcome: 'status', status: 503, retry_after_ms: 7000 });
  assert.deepEqual(toTransactionResult({ status: 500, body: {}, retryAfterMs: 7000 }), { outcome: 'status', status: 500 }, 'retry-after only on 429/503');
  assert.deepEqual(toTransactionResult({ status: 410, body: '{"errcode":"M_GONE"}' }), { outcome: 'status', status: 410, errcode: 'M_GONE' });
  assert.deepEqual(toTransactionResult({ error: 'unreachable' }), { outcome: 'unreachable' });
  assert.deepEqual(toTransactionResult({ error: 'timeout' }), { outcome: 'timeout' });
  for (const bad of [undefined, null, 200, { status: 99 }, { status: 200.5 }, { error: 'dns' }, { status: 429, retryAfterMs: -1 }]) {
    assert.throws(() => toTransactionResult(bad), CallbackError, JSON.stringify(bad));
  }
  assert.throws(() => new fedsend.TransportError('dns'), /kind must be "unreachable" or "timeout"/);
});

test('the browser entry refuses to construct before init() and works after it', () => {
  const browser = fileURLToPath(new URL('../src/browser.js', import.meta.url));
  const wasm = fileURLToPath(new URL('../dist/fedsend_wasm_bg.wasm', import.meta.url));
  const script = `
    const { init, Machine, NotInitialisedError } = await import(${JSON.stringify(browser)});
    const { readFileSync } = await import('node:fs');
    let before = '';
    try { new Machine({ server_name: 'a.test' }); } catch (e) { before = e instanceof NotInitialisedError ? e.code : String(e); }
    await init(readFileSync(${JSON.stringify(wasm)}));
    const m = new Machine({ server_name: 'a.test' });
    m.handleInput(1, { type: 'timeout' });
    console.log(before, m.pollOutput().type);
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  assert.equal(r.stderr, '');
  assert.equal(r.stdout.trim(), 'ERR_FEDSEND_NOT_INITIALISED persist');
});
