// The driven FederationSender: a thin wrapper over the one run loop of fedsend (crate
// fedsend-driver, compiled with wasm-bindgen as host-wasm's DrivenSender). The loop is Rust's:
// it feeds the machine, writes persist batches in order, acknowledges to-device and
// device-list submissions once their rows are durable, arms the machine's timers and answers
// every request exactly once (a failed callback as storage_failed, which the core retries).
//
// What stays here is what only JavaScript can do: checking the options, turning each user
// callback into an adapter that never throws (a throw, a rejection or a bad return value is
// reported as a typed error where it happens, naming the callback, and then fails the request),
// signing, the request timeout and its AbortSignal, and the typed errors of the API. Values
// cross the boundary as objects, not JSON text. A callback may call back into the sender (say,
// sendEdu from onEvent): the driver defers such a call until its current step is done.

import { DrivenSender } from '../dist/fedsend_wasm.js';
import { ensureInitialised, validateConfig, checkMs } from './machine.js';
import { CallbackError, ClosedError, ConfigError, FedsendError, InputError, describe } from './errors.js';
import { toTransactionResult, outcomeOfError } from './transport.js';
import { MemoryStore, sharedTables } from './memory-store.js';

const REQUEST_TIMEOUT_DEFAULT_MS = 60_000;

const systemClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
};

function requireFunction(object, name, where) {
  if (typeof object?.[name] !== 'function') throw new ConfigError(`${where}.${name} must be a function`);
}

function checkOptions(options) {
  if (options === null || typeof options !== 'object') throw new ConfigError('FederationSender options must be an object');
  const { transport, homeserver, store, clock } = options;
  requireFunction(transport, 'sendTransaction', 'options.transport');
  requireFunction(homeserver, 'fetchEvents', 'options.homeserver');
  requireFunction(homeserver, 'loadCatchUp', 'options.homeserver');
  if (homeserver.loadOutstanding !== undefined) requireFunction(homeserver, 'loadOutstanding', 'options.homeserver');
  if (store !== undefined) {
    for (const name of ['loadRecovered', 'applyChanges', 'catchUpRows', 'loadOutstanding']) {
      requireFunction(store, name, 'options.store');
    }
  }
  if (clock !== undefined) {
    for (const name of ['now', 'setTimeout', 'clearTimeout']) requireFunction(clock, name, 'options.clock');
  }
  for (const name of ['onEvent', 'onError', 'onOutput']) {
    if (options[name] !== undefined && typeof options[name] !== 'function') {
      throw new ConfigError(`options.${name} must be a function`);
    }
  }
  if (options.signingKey !== undefined && typeof options.signingKey?.authorization !== 'function') {
    throw new ConfigError('options.signingKey must be a SigningKey (from fedsend)');
  }
  if (options.firstStartEventsPosition !== undefined) checkMs('options.firstStartEventsPosition', options.firstStartEventsPosition);
}

/**
 * A federation sender that runs itself. See index.d.ts for the option and method contracts.
 */
export class FederationSender {
  #options;
  #config;
  #store;
  #timers; // the clock the request timeout runs on
  #driven = null;
  #queue = []; // commands received before start-up finished
  #closed = false;
  #closeCause = null;
  #requestTimeoutMs;
  #closedPromise = null;

  /** Resolves when the sender has loaded its state and started; rejects if that failed. */
  ready;

  constructor(options) {
    checkOptions(options);
    this.#options = options;
    this.#timers = options.clock ?? systemClock;
    this.#store = options.store ?? new MemoryStore();
    let config = options.config;
    if (typeof config === 'string') {
      try {
        config = JSON.parse(config);
      } catch (e) {
        throw new ConfigError(`invalid config: ${describe(e)}`);
      }
    }
    // Validated now, so a wrong key or type throws here and not somewhere in a callback.
    validateConfig(config);
    // A copy: the host changing its object later must not change what this sender signs as.
    this.#config = structuredClone(config);
    this.#requestTimeoutMs = config.request_timeout_ms ?? REQUEST_TIMEOUT_DEFAULT_MS;
    this.ready = this.#start();
    // Start-up failure is also reported to onError; this keeps an unawaited `ready` from
    // becoming an unhandled rejection.
    this.ready.catch(() => {});
  }

  /** Creates a sender and waits until it has started. */
  static async start(options) {
    await ensureInitialised();
    const sender = new FederationSender(options);
    await sender.ready;
    return sender;
  }

  async #start() {
    try {
      let recovered;
      try {
        recovered = await this.#store.loadRecovered();
      } catch (e) {
        throw new CallbackError('store.loadRecovered', describe(e), { cause: e });
      }
      if (recovered === null || typeof recovered !== 'object') {
        throw new CallbackError('store.loadRecovered', `must return a Recovered object, got ${describe(recovered)}`);
      }
      if (recovered.events_out_pos == null && this.#options.firstStartEventsPosition !== undefined) {
        recovered = { ...recovered, events_out_pos: this.#options.firstStartEventsPosition };
      }
      if (this.#closed) throw new ClosedError('closed before start-up finished');
      try {
        // Runs the machine's first step (the start-up timeout) before returning.
        this.#driven = new DrivenSender(this.#config, recovered, this.#host(), sharedTables(this.#store));
      } catch (e) {
        throw /recovered/.test(describe(e))
          ? new CallbackError('store.loadRecovered', describe(e), { cause: e })
          : new ConfigError(describe(e), { cause: e });
      }
      const queued = this.#queue;
      this.#queue = [];
      for (const { input, resolve, reject } of queued) {
        try {
          resolve(this.#command(input));
        } catch (e) {
          reject(e);
        }
      }
    } catch (e) {
      this.#closeCause = e;
      this.#closed = true;
      for (const { reject } of this.#queue) reject(new ClosedError('the sender failed to start', { cause: e }));
      this.#queue = [];
      this.#report(e);
      throw e;
    }
  }

  // ----- commands -----

  /** The homeserver persisted events up to `upTo` (inclusive); they are fetched and sent. */
  newEvents(upTo) {
    checkMs('upTo', upTo);
    return this.#submit({ type: 'new_events', up_to: upTo });
  }

  /** Alias of newEvents: PDUs are announced by stream position, then fetched. */
  sendPdu(upTo) {
    return this.newEvents(upTo);
  }

  sendEdu({ destination, edu_type, content, key } = {}) {
    return this.#submit({ type: 'edu', destination, edu_type, content, ...(key === undefined ? {} : { key }) });
  }

  sendReceipt({ receipt, hosts, event } = {}) {
    return this.#submit({ type: 'receipt', receipt, hosts, ...(event === undefined ? {} : { event }) });
  }

  sendTyping({ room_id, user_id, typing, hosts } = {}) {
    return this.#submit({ type: 'typing', room_id, user_id, typing, hosts });
  }

  sendPresence({ states, destinations } = {}) {
    return this.#submit({ type: 'presence', states, destinations });
  }

  /**
   * Queues to-device messages; resolves once their outbox rows are durable (acknowledge the
   * client then), rejects if the sender closes first.
   */
  sendToDevice({ sender, message_type, message_id, messages } = {}) {
    const input = { type: 'to_device', sender, message_type, messages };
    if (message_id !== undefined) input.message_id = message_id;
    return this.#submit(input);
  }

  /**
   * Announces a change of a local user's device; resolves once the per-destination pokes are
   * durable (the homeserver may then treat the change as handed over), rejects if the sender
   * closes first.
   */
  sendDeviceListUpdate({ user_id, device_id, stream_id, deleted, keys, device_display_name, destinations } = {}) {
    const input = { type: 'device_list_update', user_id, device_id, stream_id, destinations };
    if (deleted !== undefined) input.deleted = deleted;
    if (keys !== undefined) input.keys = keys;
    if (device_display_name !== undefined) input.device_display_name = device_display_name;
    return this.#submit(input);
  }

  /** Announces new cross-signing keys of a local user; resolves as sendDeviceListUpdate does. */
  sendSigningKeyUpdate({ user_id, stream_id, master_key, self_signing_key, destinations } = {}) {
    const input = { type: 'signing_key_update', user_id, stream_id, destinations };
    if (master_key !== undefined) input.master_key = master_key;
    if (self_signing_key !== undefined) input.self_signing_key = self_signing_key;
    return this.#submit(input);
  }

  remoteUp(destination) {
    return this.#submit({ type: 'remote_up', destination });
  }

  wakeDestination(destination) {
    return this.#submit({ type: 'wake_destination', destination });
  }

  setDestinationState(state) {
    return this.#submit({ type: 'set_destination_state', state });
  }

  /** Any command input of the core as its tagged object (for variants without a method). */
  handle(input) {
    if (input === null || typeof input !== 'object' || typeof input.type !== 'string') {
      throw new InputError('handle: input must be an object with a string `type`');
    }
    if (COMPLETIONS.has(input.type)) {
      // The sender answers its own requests; a second answer could claim a write was durable.
      throw new InputError(`handle: \`${input.type}\` is a completion, which the sender delivers itself`);
    }
    return this.#submit(input);
  }

  /** Per-destination figures, sorted by destination ([] before start-up finished). */
  destinationStats() {
    this.#checkOpen();
    return this.#driven ? this.#driven.destinationStats() : [];
  }

  /** Whether close() was called (or start-up failed). */
  get closed() {
    return this.#closed;
  }

  /**
   * Stops: no new work starts, timers are cleared, transactions in flight are aborted, and
   * the storage write in flight is awaited, so nothing acknowledged is half-written. The store
   * is the host's and stays open. Idempotent.
   */
  close() {
    if (this.#closedPromise) return this.#closedPromise;
    this.#closed = true;
    this.#closeCause ??= new ClosedError('the sender is closed');
    for (const { reject } of this.#queue) reject(new ClosedError('the sender closed before start-up finished'));
    this.#queue = [];
    // At once, not after `ready`: timers and requests stop now.
    const stopped = this.#driven?.stop();
    this.#closedPromise = (async () => {
      await this.ready.catch(() => {});
      await (stopped ?? this.#driven?.stop());
      this.#driven?.free();
      this.#driven = null;
    })();
    return this.#closedPromise;
  }

  // ----- the wrapper -----

  #checkOpen() {
    if (this.#closed) {
      throw new ClosedError(
        this.#closeCause instanceof ClosedError
          ? 'the sender is closed'
          : `the sender is closed (start-up failed: ${describe(this.#closeCause)})`,
      );
    }
  }

  #submit(input) {
    this.#checkOpen();
    if (!this.#driven) {
      return new Promise((resolve, reject) => this.#queue.push({ input, resolve, reject }));
    }
    return this.#command(input);
  }

  // Called from outside the loop, a refused command throws InputError at once; called from
  // inside a callback, the driver runs it after its current step and a refusal rejects the
  // returned promise. The promise resolves when what the host may acknowledge is durable
  // (to-device rows, device-list pokes), otherwise at once.
  #command(input) {
    let receipt;
    try {
      receipt = this.#driven.submit(input);
    } catch (e) {
      throw typedRejection(e);
    }
    return receipt === undefined ? RESOLVED : receipt.catch((e) => Promise.reject(typedRejection(e)));
  }

  #report(error) {
    const onError = this.#options.onError;
    if (onError) {
      try {
        onError(error);
        return;
      } catch {
        // An onError that throws has nowhere better to go than the default below.
      }
    }
    // Never silent: without onError, problems go to the console.
    console.error(`fedsend: ${error instanceof Error ? error.message : describe(error)}`);
  }

  #callHook(name, value) {
    const hook = this.#options[name];
    if (!hook) return;
    try {
      const result = hook(value);
      if (result && typeof result.then === 'function') result.then(undefined, (e) => this.#report(new CallbackError(name, describe(e), { cause: e })));
    } catch (e) {
      this.#report(new CallbackError(name, describe(e), { cause: e }));
    }
  }

  // Reports a callback's failure as that callback's CallbackError; the returned error is what
  // the adapter rejects with (the driver answers the request as storage_failed with it).
  #failed(callback, e) {
    const error = e instanceof CallbackError ? e : new CallbackError(callback, describe(e), { cause: e });
    this.#report(error);
    return error;
  }

  // The adapters the driver calls (host-wasm/src/driven_sender.rs, DrivenHost): each returns a
  // promise and never throws.
  #host() {
    const { homeserver } = this.#options;
    const store = this.#store;
    const query = async (callback, run) => {
      let value;
      try {
        value = await run();
      } catch (e) {
        throw this.#failed(callback, e);
      }
      if (!Array.isArray(value)) throw this.#failed(callback, new CallbackError(callback, `must return an array, got ${describe(value)}`));
      return value;
    };
    const applyFailed = (e) => Promise.reject(this.#failed('store.applyChanges', e));
    return {
      applyChanges: (changes) => {
        try {
          const written = store.applyChanges(changes);
          // A synchronous store (MemoryStore, SqliteStore) costs no extra turn of the loop.
          return written && typeof written.then === 'function' ? Promise.resolve(written).then(undefined, applyFailed) : RESOLVED;
        } catch (e) {
          return applyFailed(e);
        }
      },
      fetchEvents: (after, limit) => query('homeserver.fetchEvents', () => homeserver.fetchEvents({ after, limit })),
      loadCatchUp: (destination, after, up_to, limit) =>
        query('homeserver.loadCatchUp', async () => {
          const request = { destination, after, up_to, limit };
          const rows = await store.catchUpRows(request);
          if (!Array.isArray(rows)) throw new CallbackError('store.catchUpRows', `must return an array, got ${describe(rows)}`);
          return homeserver.loadCatchUp({ ...request, rows });
        }),
      loadOutstanding: (after, limit) =>
        query('loadOutstanding', () => {
          const request = { after: after ?? null, limit };
          return homeserver.loadOutstanding ? homeserver.loadOutstanding(request) : store.loadOutstanding(request);
        }),
      outstandingFromHomeserver: homeserver.loadOutstanding !== undefined,
      sendTransaction: (transaction) => this.#sendTransaction(transaction),
      onEvent: (event) => this.#callHook('onEvent', event),
      refused: (callback, why) => this.#report(new CallbackError(callback, `returned data the sender refused: ${why}`)),
      engineProblem: (what) => this.#report(new FedsendError(what)),
      clock: this.#options.clock ? this.#checkedClock(this.#options.clock) : undefined,
    };
  }

  // The user's clock as the driver uses it: a bad reading or a throw is reported, and the
  // last good reading used instead, so the loop never sees a time that is not whole ms.
  #checkedClock(clock) {
    let lastGood = 0;
    const now = () => {
      let reading;
      try {
        reading = clock.now();
      } catch (e) {
        this.#report(new CallbackError('clock.now', describe(e), { cause: e }));
        return lastGood;
      }
      if (!Number.isSafeInteger(reading) || reading < 0) {
        this.#report(new CallbackError('clock.now', `must return whole Unix milliseconds, got ${describe(reading)}`));
        return lastGood;
      }
      lastGood = reading;
      return reading;
    };
    return {
      now,
      // setTimeout stores delays as 32-bit ints; the driver never asks for more.
      setTimeout: (fn, ms) => {
        try {
          return clock.setTimeout(fn, ms);
        } catch (e) {
          this.#report(new CallbackError('clock.setTimeout', describe(e), { cause: e }));
          return null;
        }
      },
      clearTimeout: (handle) => {
        try {
          clock.clearTimeout(handle);
        } catch (e) {
          this.#report(new CallbackError('clock.clearTimeout', describe(e), { cause: e }));
        }
      },
    };
  }

  // One attempt: { done: a promise of the TransactionResult (never rejects), abort() }. The
  // driver aborts a request it no longer waits for (close()).
  #sendTransaction({ destination, txn_id, body, attempt, pdu_ids }) {
    const controller = new AbortController();
    return { done: this.#attempt(controller, destination, txn_id, body, attempt, pdu_ids), abort: () => controller.abort(new ClosedError('the sender closed')) };
  }

  async #attempt(controller, destination, txn_id, body, attempt, pdu_ids) {
    const timers = this.#timers;
    let timer = null;
    let result;
    try {
      let authorization;
      if (this.#options.signingKey) {
        authorization = this.#options.signingKey.authorization({
          origin: this.#config.server_name,
          destination,
          method: 'PUT',
          uri: `/_matrix/federation/v1/send/${encodeURIComponent(txn_id)}`,
          content: body,
        });
      }
      // Ends the race at the request timeout, and at close(), whether or not the transport
      // honours the signal.
      const aborted = new Promise((resolve) => {
        controller.signal.addEventListener('abort', () => resolve({ error: 'timeout' }), { once: true });
      });
      timer = timers.setTimeout(() => {
        controller.abort(new DOMException('request timed out', 'TimeoutError'));
      }, this.#requestTimeoutMs);
      const sent = Promise.resolve().then(() =>
        this.#options.transport.sendTransaction(destination, txn_id, body, authorization, {
          signal: controller.signal,
          attempt,
          pduIds: pdu_ids,
        }),
      );
      try {
        result = toTransactionResult(await Promise.race([sent, aborted]));
      } catch (e) {
        if (e instanceof CallbackError) {
          // Malformed answer: it is unknown whether the remote got it, like a timeout.
          this.#report(e);
          result = { outcome: 'timeout' };
        } else {
          const { result: mapped, known } = outcomeOfError(e);
          if (!known && !this.#closed) {
            this.#report(new CallbackError('transport.sendTransaction', `threw: ${describe(e)}`, { cause: e }));
          }
          result = mapped;
        }
      }
    } catch (e) {
      // Signing failed: nothing was sent.
      this.#report(e instanceof FedsendError ? e : new FedsendError(`signing the transaction failed: ${describe(e)}`, { cause: e }));
      result = { outcome: 'unreachable' };
    } finally {
      if (timer !== null) timers.clearTimeout(timer);
    }
    return result;
  }
}

const RESOLVED = Promise.resolve();

// The driver's refusals (an Error with `kind`) as the API's typed errors.
function typedRejection(e) {
  switch (e?.kind) {
    case 'refused':
      return new InputError(e.message);
    case 'stopped':
      return new ClosedError('the sender closed before the submitted rows were durable');
    case 'not_stored':
      return new FedsendError(e.message);
    default:
      return e;
  }
}

const COMPLETIONS = new Set(['events_fetched', 'catch_up_loaded', 'outstanding_loaded', 'persisted', 'storage_failed', 'transaction_done']);
