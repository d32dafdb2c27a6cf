// Matrix signing from fedsend-sign (the native host's code, compiled into the same wasm
// module): canonical JSON, JSON signatures and the X-Matrix Authorization header.

import {
  WasmSigningKey,
  wasmCanonicalJson,
  wasmSignJson,
  wasmVerifyJson,
  wasmXMatrixAuthorization,
} from '../dist/fedsend_wasm.js';
import { ConfigError, FedsendError, InputError, describe } from './errors.js';

/** A signing or verification failure (bad key, bad signature, a float in canonical JSON, …). */
export class SignError extends FedsendError {
  get code() {
    return 'ERR_FEDSEND_SIGN';
  }
}

function wrap(fn) {
  try {
    return fn();
  } catch (e) {
    throw e instanceof FedsendError ? e : new SignError(describe(e));
  }
}

function jsonText(what, value) {
  if (value === undefined || typeof value === 'function' || typeof value === 'symbol') {
    throw new InputError(`${what} must be a JSON value, got ${typeof value}`);
  }
  return JSON.stringify(value);
}

function requireString(what, value) {
  if (typeof value !== 'string') throw new InputError(`${what} must be a string, got ${describe(value)}`);
}

/** An ed25519 signing key with its Matrix key id (`ed25519:<version>`). */
export class SigningKey {
  #inner;

  constructor(inner) {
    if (!(inner instanceof WasmSigningKey)) {
      throw new ConfigError('use SigningKey.fromSeedBase64, fromSeedBytes or fromSynapseKeyFile');
    }
    this.#inner = inner;
  }

  static fromSeedBase64(keyId, seedBase64) {
    requireString('keyId', keyId);
    requireString('seedBase64', seedBase64);
    return new SigningKey(wrap(() => WasmSigningKey.fromSeedBase64(keyId, seedBase64)));
  }

  static fromSeedBytes(keyId, seed) {
    requireString('keyId', keyId);
    if (!(seed instanceof Uint8Array)) throw new InputError('seed must be a Uint8Array of 32 bytes');
    return new SigningKey(wrap(() => WasmSigningKey.fromSeedBytes(keyId, seed)));
  }

  /** The first key of a Synapse signing key file's text. */
  static fromSynapseKeyFile(text) {
    requireString('text', text);
    return new SigningKey(wrap(() => WasmSigningKey.fromSynapseKeyFile(text)));
  }

  get keyId() {
    return this.#inner.keyId;
  }

  get publicKeyBase64() {
    return this.#inner.publicKeyBase64;
  }

  toSynapseKeyFile() {
    return this.#inner.toSynapseKeyFile();
  }

  /** The X-Matrix header value for a request; `content` is the body as JSON text or a value. */
  authorization({ origin, destination, method, uri, content }) {
    return xMatrixAuthorization({ origin, destination, method, uri, content, key: this });
  }

  /** @internal */
  get _wasm() {
    return this.#inner;
  }
}

/** Matrix canonical JSON of a value (sorted keys, no whitespace, integers only). */
export function canonicalJson(value) {
  const json = jsonText('value', value);
  return wrap(() => wasmCanonicalJson(json));
}

/** A copy of `value` with `signatures[origin][key.keyId]` added. */
export function signJson(value, origin, key) {
  requireString('origin', origin);
  if (!(key instanceof SigningKey)) throw new InputError('key must be a SigningKey');
  const json = jsonText('value', value);
  return JSON.parse(wrap(() => wasmSignJson(json, origin, key._wasm)));
}

/** Throws SignError unless `value` carries a valid signature by `origin` with `keyId`. */
export function verifyJson(value, origin, keyId, publicKeyBase64) {
  requireString('origin', origin);
  requireString('keyId', keyId);
  requireString('publicKeyBase64', publicKeyBase64);
  const json = jsonText('value', value);
  wrap(() => wasmVerifyJson(json, origin, keyId, publicKeyBase64));
}

/**
 * The `Authorization` header value of a federation request. `uri` is the path and query as
 * sent; `content` is the body as JSON text (used as is, e.g. a transaction body) or a value.
 */
export function xMatrixAuthorization({ origin, destination, method, uri, content, key }) {
  for (const [what, value] of Object.entries({ origin, destination, method, uri })) requireString(what, value);
  if (!(key instanceof SigningKey)) throw new InputError('key must be a SigningKey');
  const json = content === undefined ? undefined : typeof content === 'string' ? content : jsonText('content', content);
  return wrap(() => wasmXMatrixAuthorization(origin, destination, method, uri, json, key._wasm));
}
