// The Node scenario runner, bin/fedsend-scenario.mjs (needs host-wasm/pkg/node: scripts/build-wasm.sh).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const RUNNER = fileURLToPath(new URL('../bin/fedsend-scenario.mjs', import.meta.url));

const TINY = {
  server_name: 'test',
  steps: [
    { op: 'create_room', room: '!r:test', creator: '@a:test' },
    { op: 'join', room: '!r:test', user: '@b:host2' },
    { op: 'send', room: '!r:test', sender: '@a:test', content: { msgtype: 'm.text', body: 'hi' } },
    { op: 'advance', ms: 1000 },
    { op: 'snapshot' },
  ],
};

function withScenario(contents, fn) {
  const dir = mkdtempSync(join(tmpdir(), 'fedsend-runner-'));
  try {
    const file = join(dir, 'scenario.json');
    writeFileSync(file, typeof contents === 'string' || Buffer.isBuffer(contents) ? contents : JSON.stringify(contents));
    return fn(file);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function run(...args) {
  return spawnSync(process.execPath, [RUNNER, ...args], { encoding: 'utf8' });
}

test('a scenario prints its trace, one JSON object per line, ending with `end`', () => {
  withScenario(TINY, (file) => {
    const r = run(file);
    assert.equal(r.stderr, '');
    assert.equal(r.status, 0);
    assert.ok(r.stdout.endsWith('\n'), 'the trace ends with a newline');
    const lines = r.stdout.slice(0, -1).split('\n').map((line) => JSON.parse(line));
    assert.equal(lines.at(-1).kind, 'end');
    assert.equal(lines.filter((l) => l.kind === 'end').length, 1);
    for (const line of lines) assert.equal(typeof line.t, 'number', JSON.stringify(line));
  });
});

test('the same scenario gives the same bytes twice', () => {
  withScenario(TINY, (file) => assert.equal(run(file).stdout, run(file).stdout));
});

test('a malformed scenario (unknown op) exits 1 with one line naming the step', () => {
  const bad = structuredClone(TINY);
  bad.steps.splice(2, 0, { op: 'frobnicate', room: '!r:test' });
  withScenario(bad, (file) => {
    const r = run(file);
    assert.equal(r.status, 1, `exit status; stderr: ${r.stderr}`);
    assert.match(r.stderr, /^fedsend-scenario: .*scenario\.json: \S.*\n$/);
    assert.equal(r.stderr.split('\n').length, 2, `one line: ${r.stderr}`);
    assert.match(r.stderr, /\b2\b/, `names step 2: ${r.stderr}`);
  });
});

test('a file that is not JSON exits 1 with one line', () => {
  withScenario('{"server_name": "test", "steps": [', (file) => {
    const r = run(file);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /^fedsend-scenario: .*: \S[^\n]*\n$/);
  });
});

test('an unreadable file exits 2 with a clear message', () => {
  const r = run('/nonexistent/scenario.json');
  assert.equal(r.status, 2);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr, 'fedsend-scenario: /nonexistent/scenario.json: cannot read: no such file\n');
  withScenario(Buffer.from([0x7b, 0xff, 0x7d]), (file) => {
    const bad = run(file);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /: cannot read: not valid UTF-8\n$/);
  });
});

test('wrong usage exits 2', () => {
  assert.equal(run().status, 2);
  assert.equal(run('a.json', 'b.json').status, 2);
  assert.match(run().stderr, /^fedsend-scenario: usage: fedsend-scenario FILE\.json\n$/);
});

// Cross-engine check against the native CLI when one is named (FEDSEND_BIN=target/release/fedsend):
// the traces must be byte-identical (spec: scenarios.md). tests/ holds the full conformance run.
const NATIVE = process.env.FEDSEND_BIN;
test('the trace is byte-identical to the native engine', { skip: !NATIVE && 'set FEDSEND_BIN to the native fedsend binary' }, () => {
  const demo = fileURLToPath(new URL('../scenarios/demo.json', import.meta.url));
  for (const scenario of [TINY, demo]) {
    const check = (file) => {
      const native = spawnSync(NATIVE, ['scenario', file], { encoding: 'utf8' });
      assert.equal(native.status, 0, native.stderr);
      const node = run(file);
      assert.equal(node.status, 0, node.stderr);
      assert.equal(node.stdout, native.stdout);
    };
    if (typeof scenario === 'string') check(scenario);
    else withScenario(scenario, check);
  }
});
