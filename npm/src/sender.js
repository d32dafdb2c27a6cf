// The driven FederationSender: runs the core's loop (core/src/lib.rs, "The run-loop contract")
// with timers and the host's async callbacks.
//
// The loop is JavaScript over the raw Machine rather than Rust futures (wasm-bindgen-futures,
// gloo-timers) because every await here is on a host callback anyway: in JS the callbacks'
// throws, rejections and odd return values are caught where they happen, a fake clock can be
// injected for tests, timers can be cleared on close(), and nothing is held across an await
// inside the wasm instance, so a callback that calls back into the sender (say, sendEdu from
// onEvent) cannot hit a re-entrancy trap of the wasm object.

import { Machine, ensureInitialised, validateConfig, checkMs } from './machine.js';
import { CallbackError, ClosedError, ConfigError, FedsendError, InputError, describe } from './errors.js';
import { toTransactionResult, outcomeOfError } from './transport.js';
import { MemoryStore } from './memory-store.js';

// setTimeout stores delays as 32-bit signed ints; longer ones fire at once. A far deadline is
// reached in hops (an early timeout input is harmless).
const TIMER_DELAY_MAX_MS = 2 ** 31 - 1;
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
  #clock;
  #store;
  #machine = null;
  #queue = []; // commands received before start-up finished
  #running = false; // inside #pump: inputs from callbacks are queued behind the current one
  #pendingInputs = [];
  #timer = null;
  #timerDeadline = undefined;
  #closed = false;
  #closeCause = null;
  #inFlight = new Set(); // storage writes and transactions under way (close() awaits them)
  #aborts = new Set(); // AbortControllers of transactions under way
  #requestTimeoutMs;
  #persistRows = new Map(); // persist request id → durability keys of the rows it carries
  #durableWaiters = []; // { keys: Set, resolve, reject }
  #collectDurable = null; // while draining after an acknowledged command: durability keys seen
  #closedPromise = null;

  /** Resolves when the sender has loaded its state and started; rejects if that failed. */
  ready;

  constructor(options) {
    checkOptions(options);
    this.#options = options;
    this.#clock = options.clock ?? systemClock;
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
        this.#machine = new Machine(this.#config, recovered);
      } catch (e) {
        throw e instanceof ConfigError && /recovered/.test(e.message)
          ? new CallbackError('store.loadRecovered', e.message, { cause: e })
          : e;
      }
      // The first timeout makes the machine persist its new incarnation and look for work.
      this.#complete({ type: 'timeout' });
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
    return this.#machine ? this.#machine.destinationStats() : [];
  }

  /** Whether close() was called (or start-up failed). */
  get closed() {
    return this.#closed;
  }

  /**
   * Stops: no new work starts, timers are cleared, transactions in flight are aborted, and
   * storage writes in flight are awaited, so nothing acknowledged is half-written. The store
   * is the host's and stays open. Idempotent.
   */
  close() {
    if (this.#closedPromise) return this.#closedPromise;
    this.#closed = true;
    this.#closeCause ??= new ClosedError('the sender is closed');
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timer = null;
    for (const controller of this.#aborts) controller.abort(new ClosedError('the sender closed'));
    for (const { reject } of this.#queue) reject(new ClosedError('the sender closed before start-up finished'));
    this.#queue = [];
    this.#closedPromise = (async () => {
      await this.ready.catch(() => {});
      while (this.#inFlight.size) await Promise.allSettled([...this.#inFlight]);
      for (const waiter of this.#durableWaiters) {
        waiter.reject(new ClosedError('the sender closed before the submitted rows were durable'));
      }
      this.#durableWaiters = [];
      this.#machine?.free();
      this.#machine = null;
    })();
    return this.#closedPromise;
  }

  // ----- the loop -----

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
    if (!this.#machine) {
      return new Promise((resolve, reject) => this.#queue.push({ input, resolve, reject }));
    }
    return this.#command(input);
  }

  // Feeds a host command. Called from outside the loop, a refused command throws InputError
  // at once; called from inside a callback (the loop is running), it is queued behind the
  // current step and a refusal rejects the returned promise. The promise resolves when what
  // the host may acknowledge is durable (to-device rows, device-list pokes), otherwise at once.
  #command(input) {
    const item = { kind: 'command', input, error: null, durable: null };
    if (this.#running) {
      const promise = new Promise((resolve, reject) => Object.assign(item, { resolve, reject }));
      this.#pendingInputs.push(item);
      return promise;
    }
    this.#pendingInputs.push(item);
    this.#pump();
    if (item.error) throw item.error;
    return item.durable ?? Promise.resolve();
  }

  // Answers an earlier output with data from a callback (or delivers a timeout).
  #complete(input) {
    if (this.#closed || !this.#machine) return;
    this.#pendingInputs.push({ kind: 'completion', input });
    if (!this.#running) this.#pump();
  }

  // The single owner of the machine: one input at a time, each followed by a full drain.
  // Callbacks run during a drain may add inputs; they are handled here, in order.
  #pump() {
    this.#running = true;
    try {
      while (this.#pendingInputs.length && this.#machine) {
        const item = this.#pendingInputs.shift();
        if (item.kind === 'command') this.#runCommand(item);
        else this.#runCompletion(item.input);
      }
    } finally {
      this.#running = false;
    }
    try {
      this.#armTimer();
    } catch (e) {
      this.#report(e);
    }
  }

  #runCommand(item) {
    const collect = ACKNOWLEDGED.has(item.input.type) ? new Set() : null;
    this.#collectDurable = collect;
    try {
      this.#machine.handleInput(this.#now(), item.input);
      this.#drain();
    } catch (e) {
      item.error = e;
      item.reject?.(e);
      return;
    } finally {
      this.#collectDurable = null;
    }
    if (collect && collect.size) {
      item.durable = new Promise((resolve, reject) => this.#durableWaiters.push({ keys: collect, resolve, reject }));
    }
    item.resolve?.(item.durable ?? undefined);
  }

  // When the machine refuses a completion (malformed callback data), the request is answered
  // as a storage failure instead, so the machine retries it rather than waiting forever, and
  // the host hears about the bad data.
  #runCompletion(input) {
    try {
      this.#machine.handleInput(this.#now(), input);
    } catch (e) {
      if (input.request === undefined || !(e instanceof InputError)) {
        this.#report(e);
        return;
      }
      const callback = CALLBACK_OF[input.type] ?? input.type;
      this.#report(new CallbackError(callback, `returned data the sender refused: ${e.message}`, { cause: e }));
      try {
        this.#machine.handleInput(this.#now(), { type: 'storage_failed', request: input.request, error: `${callback}: ${e.message}` });
      } catch (again) {
        this.#report(again);
      }
    }
    this.#drain();
  }

  #now() {
    const now = this.#clock.now();
    if (!Number.isSafeInteger(now) || now < 0) {
      throw new CallbackError('clock.now', `must return whole Unix milliseconds, got ${describe(now)}`);
    }
    return now;
  }

  #drain() {
    for (let output; (output = this.#machine.pollOutput()) !== undefined; ) this.#perform(output);
  }

  #armTimer() {
    if (this.#closed || !this.#machine) return;
    const deadline = this.#machine.pollTimeout();
    if (deadline === this.#timerDeadline && this.#timer !== null) return;
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timer = null;
    this.#timerDeadline = deadline;
    if (deadline === undefined) return;
    const delay = Math.min(Math.max(0, deadline - this.#now()), TIMER_DELAY_MAX_MS);
    this.#timer = this.#clock.setTimeout(() => {
      this.#timer = null;
      this.#timerDeadline = undefined;
      this.#complete({ type: 'timeout' });
    }, delay);
  }

  #perform(output) {
    switch (output.type) {
      case 'send_transaction':
        return this.#track(this.#sendTransaction(output));
      case 'fetch_events':
        return this.#query(output, 'homeserver.fetchEvents', 'events_fetched', 'events', () =>
          this.#options.homeserver.fetchEvents({ after: output.after, limit: output.limit }),
        );
      case 'load_catch_up':
        return this.#query(output, 'homeserver.loadCatchUp', 'catch_up_loaded', 'rooms', async () => {
          const query = { destination: output.destination, after: output.after, up_to: output.up_to, limit: output.limit };
          const rows = await this.#store.catchUpRows(query);
          if (!Array.isArray(rows)) throw new CallbackError('store.catchUpRows', `must return an array, got ${describe(rows)}`);
          return this.#options.homeserver.loadCatchUp({ ...query, rows });
        });
      case 'load_outstanding':
        return this.#query(output, 'loadOutstanding', 'outstanding_loaded', 'destinations', () => {
          const query = { after: output.after, limit: output.limit };
          const homeserver = this.#options.homeserver;
          return homeserver.loadOutstanding ? homeserver.loadOutstanding(query) : this.#store.loadOutstanding(query);
        });
      case 'persist':
        return this.#persist(output);
      case 'event':
        return this.#callHook('onEvent', output.event);
      default:
        if (this.#options.onOutput) return this.#callHook('onOutput', output);
        return this.#report(new FedsendError(`unhandled output type ${JSON.stringify(output.type)} (pass options.onOutput)`));
    }
  }

  #track(promise) {
    this.#inFlight.add(promise);
    promise.finally(() => this.#inFlight.delete(promise));
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

  // Runs a homeserver/store query and answers it; a failure becomes storage_failed (retried).
  // Not awaited by close(): a query writes nothing, and a hung one must not hang close().
  #query(output, callback, answerType, field, run) {
    const { request } = output;
    const answer = async () => {
      let value;
      try {
        value = await run();
      } catch (e) {
        const error = e instanceof CallbackError ? e : new CallbackError(callback, describe(e), { cause: e });
        this.#report(error);
        return this.#complete({ type: 'storage_failed', request, error: error.message });
      }
      if (!Array.isArray(value)) {
        const error = new CallbackError(callback, `must return an array, got ${describe(value)}`);
        this.#report(error);
        return this.#complete({ type: 'storage_failed', request, error: error.message });
      }
      this.#complete({ type: answerType, request, [field]: value });
    };
    answer();
  }


  #persist(output) {
    const { request, changes } = output;
    const rows = durabilityKeys(changes);
    if (rows.length) {
      this.#persistRows.set(request, rows);
      if (this.#collectDurable) for (const key of rows) this.#collectDurable.add(key);
    }
    this.#track(
      (async () => {
        try {
          await this.#store.applyChanges(changes);
        } catch (e) {
          // The machine re-issues the batch later (max-upserts make that safe); the host
          // hears about every failure.
          this.#persistRows.delete(request);
          const error = e instanceof CallbackError ? e : new CallbackError('store.applyChanges', describe(e), { cause: e });
          this.#report(error);
          return this.#complete({ type: 'storage_failed', request, error: error.message });
        }
        const durable = this.#persistRows.get(request);
        this.#persistRows.delete(request);
        if (durable) this.#rowsDurable(durable);
        this.#complete({ type: 'persisted', request });
      })(),
    );
  }

  #rowsDurable(keys) {
    this.#durableWaiters = this.#durableWaiters.filter((waiter) => {
      for (const key of keys) waiter.keys.delete(key);
      if (waiter.keys.size) return true;
      waiter.resolve();
      return false;
    });
  }

  async #sendTransaction(output) {
    const { request, destination, txn_id, body, attempt, pdu_ids } = output;
    const controller = new AbortController();
    this.#aborts.add(controller);
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
      timer = this.#clock.setTimeout(() => {
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
      if (timer !== null) this.#clock.clearTimeout(timer);
      this.#aborts.delete(controller);
    }
    this.#complete({ type: 'transaction_done', request, result });
  }
}

// Commands whose promise resolves only once the rows they queued are durable.
const ACKNOWLEDGED = new Set(['to_device', 'device_list_update', 'signing_key_update']);

// What identifies a row a command waits for, across batches: a batch that failed is re-issued
// by the machine under a new request id with the same rows.
function durabilityKeys(changes) {
  const keys = (changes.to_device_outbox ?? []).map((row) => `outbox ${row.outbox_id}`);
  for (const { destination, user_id, device_id, stream_id } of changes.device_list_pokes ?? []) {
    keys.push(`poke ${JSON.stringify([destination, user_id, device_id ?? null, stream_id])}`);
  }
  return keys;
}

const COMPLETIONS = new Set(['events_fetched', 'catch_up_loaded', 'outstanding_loaded', 'persisted', 'storage_failed', 'transaction_done']);

const CALLBACK_OF = {
  events_fetched: 'homeserver.fetchEvents',
  catch_up_loaded: 'homeserver.loadCatchUp',
  outstanding_loaded: 'loadOutstanding',
  persisted: 'store.applyChanges',
};
