// Type declarations of the `fedsend` package. The wire types mirror core/src/io.rs,
// core/src/event.rs, core/src/edu.rs and core/src/config.rs exactly: snake_case fields,
// tagged by `type` (inputs, outputs), `outcome` (transaction results) or `event` (events).
// Times are whole Unix milliseconds (numbers, exact up to 2^53 - 1).

// ---------------------------------------------------------------------------------------
// Identifiers and records

/** A Matrix server name, `host[:port]` (validated by the core). */
export type ServerName = string;
/** Correlates an output with the input that answers it. */
export type RequestId = number;
/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** A read receipt (one per room, type, user and thread). */
export interface Receipt {
  room_id: string;
  /** `m.read` */
  receipt_type: string;
  user_id: string;
  event_id: string;
  thread_id?: string;
  /** The receipt's `data` (holds `ts`). */
  data: JsonObject;
}

/** One local user's presence. */
export interface PresenceState {
  user_id: string;
  /** `online`, `unavailable` or `offline`. */
  presence: string;
  status_msg?: string;
  last_active_ts?: number;
  currently_active?: boolean;
}

/** The receipted event's sender and arrival (Unix ms). */
export interface ReceiptedEvent {
  sender: string;
  received_ts: number;
}

/** What fan-out needs to know about one persisted event. */
export interface PduInfo {
  event_id: string;
  room_id: string;
  stream_ordering: number;
  sender: string;
  /** Default true; false for a room's create event. */
  has_prev_events?: boolean;
  /** Servers with a member joined before this event. */
  hosts?: ServerName[];
  partial_state_servers?: ServerName[] | null;
  invitee_server?: ServerName | null;
  /** Default true. */
  proactively_send?: boolean;
  out_of_band?: boolean;
  send_on_behalf_of?: ServerName | null;
  received_ts?: number | null;
  /** The event in federation format. */
  pdu: Json;
}

/** A forward extremity offered for catch-up. */
export interface Extremity {
  event_id: string;
  stream_ordering: number;
  visible: boolean;
  pdu: Json;
}

/** One room owed to a destination, as a catch-up query finds it. */
export interface CatchUpRoom {
  room_id: string;
  stream_ordering: number;
  event_id: string;
  pdu: Json;
  partial_state?: boolean;
  extremities?: Extremity[];
  /** Set when the host cannot hand over the event (`pdu` is then `{}`): the core gives it up with this reason. */
  undeliverable?: string;
}

/** Stored state of one destination. */
export interface DestinationState {
  destination: ServerName;
  retry_last_ts?: number;
  retry_interval?: number;
  failure_ts?: number | null;
  last_successful_stream_ordering?: number | null;
}

/** A `destination_rooms` row. */
export interface DestinationRoom {
  destination: ServerName;
  room_id: string;
  stream_ordering: number;
}

/** A to-device EDU in the durable outbox. */
export interface OutboxRow {
  destination: ServerName;
  outbox_id: number;
  queued_ts: number;
  /** `{"content":…,"edu_type":"m.direct_to_device"}` */
  edu: Json;
}

/** A device-list change owed to one destination, durable until delivered. */
export interface DeviceListPoke {
  destination: ServerName;
  user_id: string;
  /** null for the user's cross-signing keys. */
  device_id: string | null;
  stream_id: number;
  queued_ts: number;
  /** The EDU content without `prev_id`. */
  content: Json;
}

/** A poke delivered or given up: delete the row if its stream id is at most this one. */
export interface DeviceListPokeKey {
  destination: ServerName;
  user_id: string;
  device_id: string | null;
  stream_id: number;
}

/** Per (destination, user): the newest device-list stream id acknowledged; null deletes. */
export interface DeviceListPosition {
  destination: ServerName;
  user_id: string;
  stream_id: number | null;
}

export interface OutboxKey {
  destination: ServerName;
  outbox_id: number;
}

/**
 * One atomic batch of writes to sender-owned storage: `incarnation`, `events_out_pos` and
 * `destination_rooms` are max-upserts; `destinations` whole-row upserts.
 */
export interface Changes {
  incarnation?: number;
  events_out_pos?: number;
  destination_rooms?: DestinationRoom[];
  destinations?: DestinationState[];
  to_device_outbox?: OutboxRow[];
  to_device_deleted?: OutboxKey[];
  /** Upsert by (destination, user, device), keeping the higher stream id. */
  device_list_pokes?: DeviceListPoke[];
  device_list_pokes_deleted?: DeviceListPokeKey[];
  /** Upserts or deletions, in order. */
  device_list_positions?: DeviceListPosition[];
}

/** What a store loads at start-up. */
export interface Recovered {
  incarnation?: number;
  /** null on a fresh install (fan-out then starts from 0). */
  events_out_pos?: number | null;
  destinations?: DestinationState[];
  to_device_outbox?: OutboxRow[];
  device_list_pokes?: DeviceListPoke[];
  device_list_positions?: DeviceListPosition[];
}

/** One HTTP attempt of a transaction. */
export interface OutgoingTransaction {
  request: RequestId;
  destination: ServerName;
  txn_id: string;
  attempt: number;
  pdu_ids: string[];
  /** The JSON body, canonical key order: send these bytes as they are. */
  body: string;
}

export type DestinationPhase = 'idle' | 'sending' | 'retrying' | 'backing_off' | 'catching_up' | 'gone';

/** Per-destination figures. */
export interface DestinationStats {
  destination: ServerName;
  state: DestinationPhase;
  queued_pdus: number;
  queued_edus: number;
  oldest_pending_age_ms: number | null;
  in_flight: boolean;
  backoff_until_ts: number | null;
  catching_up: boolean;
  last_success_ts: number | null;
  dropped_items: number;
  retry_interval_ms: number;
  failure_ts: number | null;
  last_successful_stream_ordering: number | null;
}

// ---------------------------------------------------------------------------------------
// Transaction results, events, inputs, outputs

/** The outcome of one HTTP attempt of a transaction. */
export type TransactionResult =
  | { outcome: 'ok'; pdu_errors?: { [eventId: string]: string } }
  | { outcome: 'status'; status: number; retry_after_ms?: number; errcode?: string }
  | { outcome: 'unreachable' }
  | { outcome: 'timeout' };

/** Something that happened (logs, metrics). */
export type Event =
  | { event: 'dropped'; destination: ServerName; item: string; reason: string }
  | { event: 'pdu_errors'; destination: ServerName; txn_id: string; errors: { [eventId: string]: string } }
  | { event: 'backing_off'; destination: ServerName; retry_interval_ms: number; until_ts: number }
  | { event: 'destination_up'; destination: ServerName }
  | { event: 'catch_up_started'; destination: ServerName }
  | { event: 'catch_up_finished'; destination: ServerName }
  | { event: 'event_skipped'; event_id: string; reason: string }
  | { event: 'storage_retry'; error: string; retry_at_ts: number };

export interface NewEventsInput { type: 'new_events'; up_to: number }
export interface WakeDestinationInput { type: 'wake_destination'; destination: ServerName }
export interface RemoteUpInput { type: 'remote_up'; destination: ServerName }
export interface EduInput { type: 'edu'; destination: ServerName; edu_type: string; content: Json; key?: string }
export interface TypingInput { type: 'typing'; room_id: string; user_id: string; typing: boolean; hosts: ServerName[] }
export interface ReceiptInput { type: 'receipt'; receipt: Receipt; hosts: ServerName[]; event?: ReceiptedEvent }
export interface ToDeviceInput {
  type: 'to_device';
  sender: string;
  message_type: string;
  message_id?: string;
  /** Recipient user → device id (or `*`) → content. */
  messages: { [userId: string]: { [deviceId: string]: Json } };
}
export interface DeviceListUpdateInput {
  type: 'device_list_update';
  user_id: string;
  device_id: string;
  /** The homeserver's device-list stream position; increases per user. */
  stream_id: number;
  deleted?: boolean;
  keys?: Json;
  device_display_name?: string;
  /** Every server sharing a room with the user. */
  destinations: ServerName[];
}
export interface SigningKeyUpdateInput {
  type: 'signing_key_update';
  user_id: string;
  stream_id: number;
  master_key?: Json;
  self_signing_key?: Json;
  destinations: ServerName[];
}
export interface PresenceInput { type: 'presence'; states: PresenceState[]; destinations: ServerName[] }
export interface SetDestinationStateInput { type: 'set_destination_state'; state: DestinationState }
/** To-device EDUs already durable in the homeserver's own outbox: sent, never persisted again. */
export interface StoredToDeviceInput { type: 'stored_to_device'; rows: OutboxRow[] }
/** Device-list changes already durable in the homeserver's own tables: sent, never persisted again. */
export interface StoredDeviceListPokesInput { type: 'stored_device_list_pokes'; pokes: DeviceListPoke[] }
export interface EventsFetchedInput { type: 'events_fetched'; request: RequestId; events: PduInfo[] }
export interface CatchUpLoadedInput { type: 'catch_up_loaded'; request: RequestId; rooms: CatchUpRoom[] }
export interface OutstandingLoadedInput { type: 'outstanding_loaded'; request: RequestId; destinations: ServerName[] }
export interface PersistedInput { type: 'persisted'; request: RequestId }
export interface StorageFailedInput { type: 'storage_failed'; request: RequestId; error: string }
export interface TransactionDoneInput { type: 'transaction_done'; request: RequestId; result: TransactionResult }
export interface TimeoutInput { type: 'timeout' }

/** Everything the host tells the machine (core/src/io.rs `Input`). */
export type Input =
  | NewEventsInput
  | WakeDestinationInput
  | RemoteUpInput
  | EduInput
  | TypingInput
  | ReceiptInput
  | ToDeviceInput
  | DeviceListUpdateInput
  | SigningKeyUpdateInput
  | PresenceInput
  | SetDestinationStateInput
  | StoredToDeviceInput
  | StoredDeviceListPokesInput
  | EventsFetchedInput
  | CatchUpLoadedInput
  | OutstandingLoadedInput
  | PersistedInput
  | StorageFailedInput
  | TransactionDoneInput
  | TimeoutInput;

/** The inputs that are host commands (what `FederationSender.handle` accepts). */
export type CommandInput =
  | NewEventsInput
  | WakeDestinationInput
  | RemoteUpInput
  | EduInput
  | TypingInput
  | ReceiptInput
  | ToDeviceInput
  | DeviceListUpdateInput
  | SigningKeyUpdateInput
  | PresenceInput
  | SetDestinationStateInput
  | StoredToDeviceInput
  | StoredDeviceListPokesInput;

export type SendTransactionOutput = { type: 'send_transaction' } & OutgoingTransaction;
export interface FetchEventsOutput { type: 'fetch_events'; request: RequestId; after: number; limit: number }
export interface LoadCatchUpOutput {
  type: 'load_catch_up';
  request: RequestId;
  destination: ServerName;
  after: number;
  up_to: number;
  limit: number;
}
export interface LoadOutstandingOutput { type: 'load_outstanding'; request: RequestId; after: ServerName | null; limit: number }
export interface PersistOutput { type: 'persist'; request: RequestId; changes: Changes }
export interface EventOutput { type: 'event'; event: Event }

/** Everything the machine asks the host to do (core/src/io.rs `Output`). */
export type Output =
  | SendTransactionOutput
  | FetchEventsOutput
  | LoadCatchUpOutput
  | LoadOutstandingOutput
  | PersistOutput
  | EventOutput;

/** The sender's configuration (core/src/config.rs; every key but `server_name` has a default). */
export interface Config {
  server_name: ServerName;
  instance_name?: string;
  instances?: string[];
  seed?: number;
  retry_interval_min_ms?: number;
  retry_multiplier?: number;
  retry_interval_max_ms?: number;
  catch_up_threshold_ms?: number;
  rr_transactions_per_room_per_second?: number;
  domain_whitelist?: ServerName[] | null;
  presence_enabled?: boolean;
  transactions_in_flight_max?: number;
  transaction_bytes_max?: number;
  pdus_per_transaction_max?: number;
  edus_per_transaction_max?: number;
  http_retries_max?: number;
  http_retry_delay_max_ms?: number;
  /** Also the driven sender's deadline for one transport call. */
  request_timeout_ms?: number;
  poison_rejections_max?: number;
  pending_pdus_max?: number;
  to_device_prune_after_ms?: number | null;
  device_list_prune_after_ms?: number | null;
  events_batch_max?: number;
  catch_up_batch_max?: number;
  catch_up_waker_period_ms?: number;
  catch_up_waker_page_max?: number;
  catch_up_waker_interval_ms?: number;
}

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
  /** Outputs this version does not know (from a newer core). */
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
