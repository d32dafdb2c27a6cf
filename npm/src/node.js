// The Node entry: the wasm module is instantiated synchronously from the package's own file at
// import time, so every class is usable at once.

import { readFileSync } from 'node:fs';
import { initSync } from '../dist/fedsend_wasm.js';
import { markInitialised } from './machine.js';

initSync({ module: readFileSync(new URL('../dist/fedsend_wasm_bg.wasm', import.meta.url)) });
markInitialised();

export * from './api.js';

/** Already done in Node; present so code can `await init()` on every platform. */
export async function init() {}
