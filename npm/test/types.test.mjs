// The declarations against the core they describe. types.d.ts is generated from the Rust types
// (core/tests/typescript.rs fails when it is stale), so the tags and keys the wasm core accepts,
// read from its own error messages, equal those declared unless someone edited the file by
// hand. index.d.ts names each variant of the generated unions; a new variant needs its name.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fedsend } from './helpers.mjs';

const TYPES = readFileSync(new URL('../types.d.ts', import.meta.url), 'utf8');
const INDEX = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8');
const REGENERATE = 'FEDSEND_BLESS=1 cargo test -p fedsend-core --features ts --test typescript';

function expectedList(message) {
  const list = /expected one of (.*?)(?: at line|$)/.exec(message)?.[1];
  assert.ok(list, message);
  return [...list.matchAll(/`([a-z_]+)`/g)].map((m) => m[1]).sort();
}

function refusal(fn) {
  try {
    fn();
  } catch (e) {
    return e.message;
  }
  assert.fail('the core accepted it');
}

/** The text of `export type NAME = …;` in types.d.ts (declarations end at a blank line). */
function declaration(name) {
  const start = TYPES.indexOf(`export type ${name} =`);
  assert.ok(start >= 0, `types.d.ts declares ${name}`);
  const end = TYPES.indexOf('\n\n', start);
  return TYPES.slice(start, end < 0 ? undefined : end);
}

function tags(name, tag) {
  return [...declaration(name).matchAll(new RegExp(`"${tag}": "([a-z_]+)"`, 'g'))].map((m) => m[1]).sort();
}

function withMachine(fn) {
  const m = new fedsend.Machine({ server_name: 'a.test' });
  try {
    return fn(m);
  } finally {
    m.free();
  }
}

test('types.d.ts says it is generated', () => {
  assert.match(TYPES.split('\n', 3).join('\n'), /Generated from the wire types of fedsend-core.*Do not edit/s);
  assert.ok(TYPES.includes(REGENERATE), 'the header names the command that regenerates it');
});

test('the Input variants the core accepts are those declared', () => {
  const core = expectedList(withMachine((m) => refusal(() => m.handleInput(1, { type: 'no_such_input' }))));
  assert.deepEqual(tags('Input', 'type'), core, `npm/types.d.ts \`Input\` is stale or edited: ${REGENERATE}`);
});

test('the transaction outcomes the core accepts are those declared', () => {
  const input = { type: 'transaction_done', request: 1, result: { outcome: 'no_such_outcome' } };
  const core = expectedList(withMachine((m) => refusal(() => m.handleInput(1, input))));
  assert.deepEqual(tags('TransactionResult', 'outcome'), core, `npm/types.d.ts \`TransactionResult\` is stale or edited: ${REGENERATE}`);
});

test('the Config keys the core accepts are those declared, all but server_name optional', () => {
  const core = expectedList(refusal(() => new fedsend.Machine({ server_name: 'a.test', no_such_key: 1 })));
  const keys = [...declaration('Config').matchAll(/^ {2}([a-z_]+)(\??):/gm)];
  assert.deepEqual(keys.map((m) => m[1]).sort(), core, `npm/types.d.ts \`Config\` is stale or edited: ${REGENERATE}`);
  // The core fills in a default for every other key (the Machine above got only server_name).
  const required = keys.filter((m) => m[2] !== '?').map((m) => m[1]);
  assert.deepEqual(required, ['server_name']);
});

test('index.d.ts names every Input and Output variant', () => {
  const named = (helper) => [...INDEX.matchAll(new RegExp(`= ${helper}<'([a-z_]+)'>;`, 'g'))].map((m) => m[1]).sort();
  assert.deepEqual(named('InputOf'), tags('Input', 'type'), 'an `export type …Input = InputOf<…>` per Input variant');
  assert.deepEqual(named('OutputOf'), tags('Output', 'type'), 'an `export type …Output = OutputOf<…>` per Output variant');
});
