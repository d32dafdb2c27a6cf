// The browser/bundler entry: the wasm file is fetched (bundlers resolve the URL in the glue)
// by `await init()`, which FederationSender.start also calls; the synchronous constructors
// throw NotInitialisedError until then.

import initWasm from '../dist/fedsend_wasm.js';
import { markInitialised, setInitialiser } from './machine.js';

let loading = null;

/** Instantiates the wasm module (once); `input` is what wasm-bindgen's init accepts (a URL, Response, bytes or Module). */
export function init(input) {
  loading ??= initWasm(input === undefined ? undefined : { module_or_path: input }).then(() => markInitialised());
  return loading;
}

setInitialiser(() => init());

export * from './api.js';
