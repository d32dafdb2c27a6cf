// Type declarations of the `fedsend` package: the hand-written JavaScript API. The wire types
// (inputs, outputs, transaction results, events, config, changes, stored records) are generated
// from the core's Rust types into types.d.ts and re-exported from here; see that file's header.

import type {
  CatchUpRoom,
  Changes,
  Config,
  DestinationState,
  DestinationStats,
  Event,
  Input,
  Json,
  JsonObject,
  Output,
  PduInfo,
  Recovered,
  ServerName,
  TransactionResult,
} from './types.js';

export * from './types.js';

// ---------------------------------------------------------------------------------------
// Names for the variants of the generated unions. The constraint on the tag makes tsc reject an
// alias whose variant the core no longer has.

type InputOf<T extends Input['type']> = Extract<Input, { type: T }>;
type OutputOf<T extends Output['type']> = Extract<Output, { type: T }>;

export type NewEventsInput = InputOf<'new_events'>;
export type WakeDestinationInput = InputOf<'wake_destination'>;
export type RemoteUpInput = InputOf<'remote_up'>;
export type EduInput = InputOf<'edu'>;
export type TypingInput = InputOf<'typing'>;
export type ReceiptInput = InputOf<'receipt'>;
export type ToDeviceInput = InputOf<'to_device'>;
export type DeviceListUpdateInput = InputOf<'device_list_update'>;
export type SigningKeyUpdateInput = InputOf<'signing_key_update'>;
export type PresenceInput = InputOf<'presence'>;
export type SetDestinationStateInput = InputOf<'set_destination_state'>;
/** To-device EDUs already durable in the homeserver's own outbox: sent, never persisted again. */
export type StoredToDeviceInput = InputOf<'stored_to_device'>;
/** Device-list changes already durable in the homeserver's own tables: sent, never persisted again. */
export type StoredDeviceListPokesInput = InputOf<'stored_device_list_pokes'>;
export type EventsFetchedInput = InputOf<'events_fetched'>;
export type CatchUpLoadedInput = InputOf<'catch_up_loaded'>;
export type OutstandingLoadedInput = InputOf<'outstanding_loaded'>;
export type PersistedInput = InputOf<'persisted'>;
export type StorageFailedInput = InputOf<'storage_failed'>;
export type TransactionDoneInput = InputOf<'transaction_done'>;
export type TimeoutInput = InputOf<'timeout'>;

/**
 * The inputs that are host commands (what `FederationSender.handle` accepts): every input but
 * the completions of the machine's own requests and the timer, which the driven sender feeds.
 */
export type CommandInput = Exclude<
  Input,
  InputOf<'events_fetched' | 'catch_up_loaded' | 'outstanding_loaded' | 'persisted' | 'storage_failed' | 'transaction_done' | 'timeout'>
>;

export type SendTransactionOutput = OutputOf<'send_transaction'>;
export type FetchEventsOutput = OutputOf<'fetch_events'>;
export type LoadCatchUpOutput = OutputOf<'load_catch_up'>;
export type LoadOutstandingOutput = OutputOf<'load_outstanding'>;
export type PersistOutput = OutputOf<'persist'>;
export type EventOutput = OutputOf<'event'>;

// ---------------------------------------------------------------------------------------
// Errors

/** Base of every error of the package; `code` is stable, messages may improve. */
export class FedsendError extends Error {
  readonly code: string;
}
/** Bad configuration or options; the message names the key. */
export class ConfigError extends FedsendError { readonly code: 'ERR_FEDSEND_CONFIG' }
/** An input the machine refused (it is unchanged). */
export class InputError extends FedsendError { readonly code: 'ERR_FEDSEND_INPUT' }
/** A call after close() or after start-up failed. */
export class ClosedError extends FedsendError { readonly code: 'ERR_FEDSEND_CLOSED' }
/** A host callback threw, rejected or returned unusable data. */
export class CallbackError extends FedsendError {
  readonly code: 'ERR_FEDSEND_CALLBACK';
  /** e.g. `store.applyChanges`, `homeserver.fetchEvents`, `transport.sendTransaction`. */
  readonly callback: string;
}
/** Browser: the wasm module is not initialised yet (`await init()`). */
export class NotInitialisedError extends FedsendError { readonly code: 'ERR_FEDSEND_NOT_INITIALISED' }
/** Signing or verification failed. */
export class SignError extends FedsendError { readonly code: 'ERR_FEDSEND_SIGN' }

// ---------------------------------------------------------------------------------------
// The raw machine

/** Instantiates the wasm module (browsers; a no-op in Node). */
export function init(input?: URL | string | Response | BufferSource | WebAssembly.Module): Promise<void>;

/** Throws ConfigError if the configuration is invalid. */
export function validateConfig(config: Config | string): void;

/**
 * The sans-IO state machine: feed inputs, drain outputs until undefined, sleep until
 * `pollTimeout()`. Objects or JSON text in; objects (or, from pollOutputJson, text) out.
 */
export class Machine {
  /** @throws ConfigError */
  constructor(config: Config | string, recovered?: Recovered | string);
  /** @throws InputError (the machine is unchanged) */
  handleInput(nowMs: number, input: Input | string): void;
  pollOutput(): Output | undefined;
  pollOutputJson(): string | undefined;
  pollTimeout(): number | undefined;
  destinationStats(): DestinationStats[];
  free(): void;
}

// ---------------------------------------------------------------------------------------
// Transport

/** What a transport resolves to: the HTTP answer, or a failure kind. */
export type TransportResponse =
  | { status: number; body?: string | Uint8Array | Json; retryAfterMs?: number | null }
  | { error: 'unreachable' | 'timeout' };

export interface SendTransactionExtra {
  /** Aborted on the request timeout and on close(). */
  signal: AbortSignal;
  attempt: number;
  pduIds: string[];
}

export interface Transport {
  /**
   * PUT `/_matrix/federation/v1/send/{txnId}` to `destination` with `body` (send it byte for
   * byte) and `Authorization: authorization` when given. Resolve with the answer; throw a
   * TransportError (or a Node network error) when nothing came back.
   */
  sendTransaction(
    destination: ServerName,
    txnId: string,
    body: string,
    authorization: string | undefined,
    extra: SendTransactionExtra,
  ): TransportResponse | Promise<TransportResponse>;
}

/** Thrown by a transport to name the failure kind. */
export class TransportError extends Error {
  constructor(kind: 'unreachable' | 'timeout', message?: string);
  readonly kind: 'unreachable' | 'timeout';
}

/** The mapping the driven sender applies to transport answers. @throws CallbackError */
export function toTransactionResult(response: TransportResponse): TransactionResult;

// ---------------------------------------------------------------------------------------
// Storage

type MaybePromise<T> = T | Promise<T>;

export interface CatchUpQuery {
  destination: ServerName;
  after: number;
  up_to: number;
  limit: number;
}

export interface OutstandingQuery {
  after: ServerName | null;
  limit: number;
}

export interface CatchUpRow {
  room_id: string;
  stream_ordering: number;
}

/** Sender-owned state: what MemoryStore and SqliteStore implement. */
export interface SenderStore {
  loadRecovered(): MaybePromise<Recovered>;
  /** Apply atomically and durably; reject (or throw) on failure: the batch is retried. */
  applyChanges(changes: Changes): MaybePromise<void>;
  /** `destination_rooms` rows of `destination` in (after, up_to], ascending, at most limit. */
  catchUpRows(query: CatchUpQuery): MaybePromise<CatchUpRow[]>;
  /** Destinations after `after` with rows above their last successful position or outbox rows. */
  loadOutstanding(query: OutstandingQuery): MaybePromise<ServerName[]>;
}

/** The default store: in memory, lost with the process. */
export class MemoryStore implements SenderStore {
  constructor();
  loadRecovered(): Recovered;
  applyChanges(changes: Changes): void;
  catchUpRows(query: CatchUpQuery): CatchUpRow[];
  loadOutstanding(query: OutstandingQuery): ServerName[];
}

/** Homeserver-owned facts the sender asks for. */
export interface Homeserver {
  /** Events with stream ordering > after, ascending, at most limit. */
  fetchEvents(query: { after: number; limit: number }): MaybePromise<PduInfo[]>;
  /**
   * The rooms owed to a destination: `rows` (from the store) joined with their events, the
   * rooms' partial-state flags and forward extremities; omit purged events.
   */
  loadCatchUp(query: CatchUpQuery & { rows: CatchUpRow[] }): MaybePromise<CatchUpRoom[]>;
  /** Optional: defaults to the store's loadOutstanding. */
  loadOutstanding?(query: OutstandingQuery): MaybePromise<ServerName[]>;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

// ---------------------------------------------------------------------------------------
// The driven sender

export interface FederationSenderOptions {
  /** `request_timeout_ms` is also the deadline of one transport call. */
  config: Config;
  transport: Transport;
  homeserver: Homeserver;
  /** Default: a new MemoryStore. */
  store?: SenderStore;
  /** Default: Date.now and the global timers. */
  clock?: Clock;
  /** Signs every transaction; its header value is passed to the transport. */
  signingKey?: SigningKey;
  /** On a fresh install (no stored position), fan out after this stream position instead of 0. */
  firstStartEventsPosition?: number;
  onEvent?(event: Event): void;
  /** Every failure of a callback, and data the sender refused (default: console.error). */
  onError?(error: FedsendError): void;
  /** Outputs this version does not know. Never called today: the core and the loop that
   * performs its outputs ship in one wasm module, and an output the loop cannot perform is
   * reported to onError. Accepted so that existing options keep working. */
  onOutput?(output: { type: string; [key: string]: unknown }): void;
}

export class FederationSender {
  /** @throws ConfigError (bad options or config) */
  constructor(options: FederationSenderOptions);
  /** Constructs and waits for start-up (rejects with the start-up failure). */
  static start(options: FederationSenderOptions): Promise<FederationSender>;
  /** Resolves when started. */
  readonly ready: Promise<void>;
  readonly closed: boolean;

  newEvents(upTo: number): Promise<void>;
  sendPdu(upTo: number): Promise<void>;
  sendEdu(edu: Omit<EduInput, 'type'>): Promise<void>;
  sendReceipt(receipt: Omit<ReceiptInput, 'type'>): Promise<void>;
  sendTyping(typing: Omit<TypingInput, 'type'>): Promise<void>;
  sendPresence(presence: Omit<PresenceInput, 'type'>): Promise<void>;
  /** Resolves when the messages are durable in the outbox (acknowledge the client then). */
  sendToDevice(message: Omit<ToDeviceInput, 'type'>): Promise<void>;
  /** Resolves when the change is durable for every destination it is owed to. */
  sendDeviceListUpdate(update: Omit<DeviceListUpdateInput, 'type'>): Promise<void>;
  /** Resolves when the new cross-signing keys are durable for every destination. */
  sendSigningKeyUpdate(update: Omit<SigningKeyUpdateInput, 'type'>): Promise<void>;
  remoteUp(destination: ServerName): Promise<void>;
  wakeDestination(destination: ServerName): Promise<void>;
  setDestinationState(state: DestinationState): Promise<void>;
  /** Any command input, including variants newer than these methods (completions are refused: the sender answers its own requests). */
  handle(input: CommandInput | { type: string; [key: string]: unknown }): Promise<void>;
  destinationStats(): DestinationStats[];
  /** Stops timers, aborts transactions in flight, awaits storage writes in flight. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------
// Signing (fedsend-sign)

export class SigningKey {
  private constructor();
  static fromSeedBase64(keyId: string, seedBase64: string): SigningKey;
  static fromSeedBytes(keyId: string, seed: Uint8Array): SigningKey;
  static fromSynapseKeyFile(text: string): SigningKey;
  readonly keyId: string;
  readonly publicKeyBase64: string;
  toSynapseKeyFile(): string;
  authorization(request: { origin: string; destination: string; method: string; uri: string; content?: string | Json }): string;
}

export function canonicalJson(value: Json): string;
export function signJson<T extends JsonObject>(value: T, origin: string, key: SigningKey): T & { signatures: { [server: string]: { [keyId: string]: string } } };
/** @throws SignError */
export function verifyJson(value: JsonObject, origin: string, keyId: string, publicKeyBase64: string): void;
export function xMatrixAuthorization(request: {
  origin: string;
  destination: string;
  method: string;
  uri: string;
  /** JSON text (used as is) or a value. */
  content?: string | Json;
  key: SigningKey;
}): string;
