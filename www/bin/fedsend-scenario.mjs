#!/usr/bin/env node
// fedsend-scenario FILE.json — runs a scenario (spec: scenarios.md) with the fedsend core
// compiled to wasm and driven from Node through wasm-bindgen, and prints the trace on stdout,
// one JSON object per line: byte-identical to `fedsend scenario FILE.json` (the core linked
// natively) and `fedsend scenario --engine wasm FILE.json` (the core in wasmtime).
//
// Exit status: 0 trace complete; 1 the scenario is malformed or the engine failed (one line
// on stderr names the step and the problem; the trace printed up to there stays on stdout,
// as the native runner prints it); 2 usage error, unreadable file, or the wasm build missing.
//
// Needs the Node build of the core: scripts/build-wasm.sh writes host-wasm/pkg/node/.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { senderEngine } from '../lib/engine.mjs';

const PROG = 'fedsend-scenario';
const PKG = fileURLToPath(new URL('../../host-wasm/pkg/node/fedsend_wasm.js', import.meta.url));
const CHUNK_BYTES = 1 << 16;

function fail(code, message) {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exitCode = code;
}

function oneLine(text) {
  return String(text).replace(/\s*\n\s*/g, ' ').trim();
}

function main(args) {
  if (args.length === 1 && (args[0] === '-h' || args[0] === '--help')) {
    process.stdout.write(`usage: ${PROG} FILE.json\nRuns a scenario with the wasm core in Node and prints its trace.\n`);
    return;
  }
  if (args.length !== 1 || args[0].startsWith('-')) {
    return fail(2, `usage: ${PROG} FILE.json`);
  }
  const file = args[0];

  let bytes;
  try {
    bytes = readFileSync(file);
  } catch (e) {
    const why = { ENOENT: 'no such file', EISDIR: 'is a directory', EACCES: 'permission denied' }[e.code];
    return fail(2, `${file}: cannot read: ${why ?? oneLine(e.message)}`);
  }
  let text;
  try {
    // Strict UTF-8 and the BOM kept, as Rust's fs::read_to_string does: the same file must
    // get the same answer from every engine.
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    return fail(2, `${file}: cannot read: not valid UTF-8`);
  }

  let wasm;
  try {
    wasm = createRequire(import.meta.url)(PKG);
  } catch (e) {
    return fail(2, `cannot load the wasm core from ${PKG} (run scripts/build-wasm.sh): ${oneLine(e.message)}`);
  }

  // stdout is written in chunks (a write per line is slow for long traces); what was emitted
  // before an error is still printed, so that the output matches a streaming native runner.
  let chunk = [];
  let chunkBytes = 0;
  const flush = () => {
    if (chunk.length) process.stdout.write(chunk.join(''));
    chunk = [];
    chunkBytes = 0;
  };
  const engine = senderEngine(wasm.FederationSender);
  try {
    wasm.runScenario(text, engine, (line) => {
      chunk.push(line, '\n');
      chunkBytes += line.length + 1;
      if (chunkBytes >= CHUNK_BYTES) flush();
    });
  } catch (e) {
    flush();
    return fail(1, `${file}: ${oneLine(e instanceof Error ? e.message : e)}`);
  } finally {
    engine.free();
  }
  flush();
}

// A closed pipe (`… | head`) is not an error of ours.
process.stdout.on('error', (e) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw e;
});
main(process.argv.slice(2));
