// Typed errors. Every error the package throws or reports is a FedsendError with a stable
// `code`, so hosts can branch on `instanceof` or on `err.code` without parsing messages.

export class FedsendError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
  get code() {
    return 'ERR_FEDSEND';
  }
}

/** The configuration (or the options object) is wrong: the message names the key. */
export class ConfigError extends FedsendError {
  get code() {
    return 'ERR_FEDSEND_CONFIG';
  }
}

/** The machine refused an input (malformed, uncorrelated, or a refused command). */
export class InputError extends FedsendError {
  get code() {
    return 'ERR_FEDSEND_INPUT';
  }
}

/** A method was called after `close()` (or after start-up failed). */
export class ClosedError extends FedsendError {
  get code() {
    return 'ERR_FEDSEND_CLOSED';
  }
}

/** A host callback threw, rejected, or returned something the package cannot use. */
export class CallbackError extends FedsendError {
  constructor(callback, message, options) {
    super(`${callback}: ${message}`, options);
    this.callback = callback;
  }
  get code() {
    return 'ERR_FEDSEND_CALLBACK';
  }
}

/** The wasm module is not ready (browser: `await init()` first). */
export class NotInitialisedError extends FedsendError {
  get code() {
    return 'ERR_FEDSEND_NOT_INITIALISED';
  }
}

/** Describes any thrown value in one line, for messages that wrap it. */
export function describe(value) {
  if (value instanceof Error) return value.message;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
