#!/usr/bin/env node
// node www/bin/serve.mjs [--port N] [--build]
//
// Serves the visualiser (www/) on http://127.0.0.1:PORT/ (default 8080) with the shipped
// scenarios of tests/scenarios/, and prints the address. Builds the wasm packages first
// (scripts/build-wasm.sh) when www/pkg is missing, or always with --build.

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serve } from '../lib/server.mjs';

const WWW = resolve(fileURLToPath(new URL('..', import.meta.url)));
const ROOT = resolve(WWW, '..');

const args = process.argv.slice(2);
let port = 8080;
let build = false;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === '--port' && /^\d+$/.test(args[i + 1] ?? '')) port = Number(args[(i += 1)]);
  else if (args[i] === '--build') build = true;
  else {
    console.error('usage: node www/bin/serve.mjs [--port N] [--build]');
    process.exit(2);
  }
}

if (build || !existsSync(join(WWW, 'pkg', 'fedsend_wasm.js'))) {
  console.error('serve: building the wasm packages (scripts/build-wasm.sh)…');
  const r = spawnSync(join(ROOT, 'scripts', 'build-wasm.sh'), { stdio: 'inherit' });
  if (r.status !== 0) process.exit(1);
}

const { url } = await serve(WWW, { scenarios: join(ROOT, 'tests', 'scenarios'), port });
console.log(`fedsend visualiser: ${url}  (live: ${url}?seed=1&n=30 · replay: ${url}?scenario=restart.json · Ctrl-C stops)`);
