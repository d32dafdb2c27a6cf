// Scenario conformance: the package's raw Machine, driven by the simulated world of
// fedsend-sim (runScenario, from the same wasm module), prints byte for byte the traces
// committed in tests/scenarios/, which the native and wasmtime engines print too.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { fedsend } from './helpers.mjs';
import { runScenario } from '../dist/fedsend_wasm.js';

const DIR = new URL('../../tests/scenarios/', import.meta.url);

function engineOver(Machine) {
  let machine;
  return {
    start(configJson, recoveredJson) {
      machine?.free();
      machine = new Machine(configJson, recoveredJson);
    },
    handleInput: (nowMs, inputJson) => machine.handleInput(nowMs, inputJson),
    pollOutput: () => machine.pollOutputJson(),
    pollTimeout: () => machine.pollTimeout(),
    free: () => machine?.free(),
  };
}

const scenarios = readdirSync(DIR)
  .filter((f) => f.endsWith('.json'))
  .sort();

test('there are committed scenarios to compare with', () => {
  assert.ok(scenarios.length >= 10, `found ${scenarios.length}`);
});

for (const file of scenarios) {
  test(`scenario ${file}: the trace equals the committed one`, () => {
    const expected = readFileSync(new URL(file.replace(/\.json$/, '.trace.jsonl'), DIR), 'utf8');
    const lines = [];
    const engine = engineOver(fedsend.Machine);
    try {
      runScenario(readFileSync(new URL(file, DIR), 'utf8'), engine, (line) => lines.push(line, '\n'));
    } finally {
      engine.free();
    }
    assert.equal(lines.join(''), expected);
  });
}

test('a machine that refuses inputs makes the scenario fail with the step named', () => {
  const engine = engineOver(fedsend.Machine);
  const refusing = { ...engine, handleInput: () => { throw new fedsend.InputError('nope'); } };
  assert.throws(
    () => runScenario(readFileSync(new URL('restart.json', DIR), 'utf8'), refusing, () => {}),
    /step \d+.*nope|nope/,
  );
  engine.free();
});
