// Everything both entry points export; node.js and browser.js differ only in how the wasm
// module is instantiated.

export { Machine, validateConfig } from './machine.js';
export { FederationSender } from './sender.js';
export { MemoryStore } from './memory-store.js';
export { toTransactionResult, TransportError } from './transport.js';
export { FedsendError, ConfigError, InputError, ClosedError, CallbackError, NotInitialisedError } from './errors.js';
export { SigningKey, SignError, canonicalJson, signJson, verifyJson, xMatrixAuthorization } from './signing.js';
