// index.d.ts against the core it describes: the Input variants and Config keys the wasm core
// accepts (read from its own error messages) must be exactly those declared. When the core
// gains an input, this fails and names what index.d.ts lacks.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fedsend } from './helpers.mjs';

const DTS = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8');

function expectedList(message) {
  const list = /expected one of (.*?)(?: at line|$)/.exec(message)?.[1];
  assert.ok(list, message);
  return [...list.matchAll(/`([a-z_]+)`/g)].map((m) => m[1]).sort();
}

function interfaceBody(name) {
  const start = DTS.indexOf(`export interface ${name} {`);
  assert.ok(start >= 0, `index.d.ts declares ${name}`);
  return DTS.slice(start, DTS.indexOf('\n}', start));
}

test('every Input variant of the core is declared in index.d.ts, and no other', () => {
  const m = new fedsend.Machine({ server_name: 'a.test' });
  let message = '';
  try {
    m.handleInput(1, { type: 'no_such_input' });
  } catch (e) {
    message = e.message;
  }
  m.free();
  const core = expectedList(message);
  const start = DTS.indexOf('export type Input =');
  const union = DTS.slice(start, DTS.indexOf(';', start));
  const declared = [...union.matchAll(/\| (\w+Input)/g)]
    .map(([, name]) => /type: '([a-z_]+)'/.exec(DTS.slice(DTS.indexOf(`export interface ${name} {`)))[1])
    .sort();
  assert.deepEqual(declared, core, 'npm/index.d.ts `Input` must list exactly the core\'s inputs (core/src/io.rs)');
});

test('every Config key of the core is declared in index.d.ts, and no other', () => {
  let message = '';
  try {
    new fedsend.Machine({ server_name: 'a.test', no_such_key: 1 });
  } catch (e) {
    message = e.message;
  }
  const core = expectedList(message);
  const declared = [...interfaceBody('Config').matchAll(/^  ([a-z_]+)\??:/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, core, 'npm/index.d.ts `Config` must list exactly the core\'s keys (core/src/config.rs)');
});
