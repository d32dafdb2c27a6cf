// The raw machine: the core's sans-IO state machine with JavaScript values at its boundary.
// Inputs and outputs are the core's tagged JSON (types.d.ts is generated from core/src/io.rs), so a new
// variant added to the core passes through here without a change.

import { SenderMachine } from '../dist/fedsend_wasm.js';
import { ConfigError, InputError, NotInitialisedError, describe } from './errors.js';

let initialised = false;
let initialiser = null;

/** Called by an entry point once the wasm module is instantiated. */
export function markInitialised() {
  initialised = true;
}

/** The browser entry registers how to instantiate the module on demand. */
export function setInitialiser(fn) {
  initialiser = fn;
}

/** Resolves once the wasm module is usable (instantiating it where that is asynchronous). */
export async function ensureInitialised() {
  if (!initialised && initialiser) await initialiser();
  if (!initialised) throw new NotInitialisedError('the fedsend wasm module is not initialised');
}

function requireInitialised() {
  if (!initialised) {
    throw new NotInitialisedError(
      'the fedsend wasm module is not initialised: in a browser, `await init()` (from "fedsend") first',
    );
  }
}

function isPlainObject(value) {
  if (value === null || typeof value !== 'object') return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** JSON text of a record given as an object or as JSON text; `what` names it in errors. */
function jsonOf(what, value, ErrorClass) {
  if (typeof value === 'string') return value;
  if (!isPlainObject(value)) {
    throw new ErrorClass(`${what} must be a plain object (or its JSON text), got ${value === null ? 'null' : typeof value}`);
  }
  try {
    return JSON.stringify(value);
  } catch (e) {
    throw new ErrorClass(`${what} cannot be encoded as JSON: ${describe(e)}`);
  }
}

/** Checks a whole number of milliseconds as the core accepts it. */
export function checkMs(what, value) {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new InputError(`${what} must be a whole number of milliseconds in 0..=2^53-1, got ${describe(value)}`);
  }
}

/**
 * The federation sender's state machine. Feed inputs with `handleInput`, drain `pollOutput`
 * until it returns undefined, sleep until `pollTimeout` (core/src/lib.rs: the run-loop
 * contract). Throws `ConfigError` for a bad configuration and `InputError` for a refused input
 * (the machine is then unchanged).
 */
export class Machine {
  #inner;

  constructor(config, recovered = {}) {
    requireInitialised();
    const configJson = jsonOf('config', config, ConfigError);
    const recoveredJson = jsonOf('recovered', recovered ?? {}, ConfigError);
    try {
      this.#inner = new SenderMachine(configJson, recoveredJson);
    } catch (e) {
      throw new ConfigError(describe(e));
    }
  }

  #live() {
    if (this.#inner === undefined) throw new InputError('this Machine was freed');
    return this.#inner;
  }

  /** Feeds one input (object or JSON text) at `nowMs` (Unix ms). */
  handleInput(nowMs, input) {
    checkMs('nowMs', nowMs);
    const inner = this.#live();
    const json = jsonOf('input', input, InputError);
    try {
      inner.handleInput(nowMs, json);
    } catch (e) {
      throw new InputError(describe(e));
    }
  }

  /** The next output, or undefined. */
  pollOutput() {
    const json = this.#live().pollOutput();
    return json === undefined ? undefined : JSON.parse(json);
  }

  /** The next output as the core's JSON text (byte-exact), or undefined. */
  pollOutputJson() {
    return this.#live().pollOutput();
  }

  /** The next deadline (Unix ms), or undefined when nothing is scheduled. */
  pollTimeout() {
    return this.#live().pollTimeout();
  }

  /** Per-destination figures, sorted by destination. */
  destinationStats() {
    return JSON.parse(this.#live().destinationStats());
  }

  /** Releases the wasm memory now rather than at garbage collection. Idempotent. */
  free() {
    this.#inner?.free();
    this.#inner = undefined;
  }
}

/** Validates a configuration without keeping a machine: throws ConfigError when it is wrong. */
export function validateConfig(config) {
  new Machine(config, {}).free();
}
