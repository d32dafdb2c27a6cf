// Generated from the wire types of fedsend-core (core/src) by ts-rs. Do not edit: change the
// Rust types, then run
//   FEDSEND_BLESS=1 cargo test -p fedsend-core --features ts --test typescript
// Times are whole Unix milliseconds; every integer is a JSON number (exact up to 2^53 - 1).

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A JSON object. */
export type JsonObject = { [key: string]: Json };

/**
 * A Matrix server name: `host[:port]`, where host is a DNS name, an IPv4 literal or a
 * bracketed IPv6 literal (Matrix spec, appendices, "Server Name").
 *
 * Shared text: the sender keeps a name in many places per destination (its map key, the
 * driven set, rows, requests, timers), so a clone is a reference-count bump, not a copy.
 */
export type ServerName = string;

/**
 * Correlates an output that needs an answer with the input that answers it.
 *
 * Ids come from a counter that starts at 1 for every machine instance; they are not
 * meaningful across restarts.
 */
export type RequestId = number;

/** A local user's read receipt. */
export type Receipt = {
  /** The room. */
  room_id: string;
  /** `m.read` (never `m.read.private`, which is not federated). */
  receipt_type: string;
  /** The local user. */
  user_id: string;
  /** The event read. */
  event_id: string;
  /** The thread, for threaded receipts. */
  thread_id?: string | null;
  /** The receipt's `data` (holds `ts`). */
  data: JsonObject;
};

/** One local user's presence, as sent in `m.presence`. */
export type PresenceState = {
  /** The local user. */
  user_id: string;
  /** `online`, `unavailable` or `offline`. */
  presence: string;
  /** Status message, if set. */
  status_msg?: string | null;
  /** Last activity (Unix ms); 0 or absent when unknown. */
  last_active_ts?: number | null;
  /** Whether the user is active right now (sent only when online). */
  currently_active?: boolean | null;
};

/** What the receipt rules need to know about the event a receipt points at. */
export type ReceiptedEvent = {
  /** The event's sender. */
  sender: string;
  /** When our server received it (Unix ms). */
  received_ts: number;
};

/** What fan-out needs to know about one persisted event (homeserver-owned facts). */
export type PduInfo = {
  /** The event id. */
  event_id: string;
  /** The room; an event without one is skipped with [`crate::Event::EventSkipped`]. */
  room_id: string;
  /** Position in the homeserver's events stream. */
  stream_ordering: number;
  /** The sender's user id; only events of local senders are sent (or on-behalf-of ones). */
  sender: string;
  /** False for a room's create event, which goes nowhere. */
  has_prev_events?: boolean;
  /**
   * Servers with a member joined in the room state *before* this event, so that a server
   * whose last member is kicked still receives the kick.
   */
  hosts?: Array<ServerName>;
  /** For a partial-state room: the servers recorded at join time, used instead of `hosts`. */
  partial_state_servers?: Array<ServerName> | null;
  /** For a kick or rescind of an invite: the invitee's server, which must learn of it. */
  invitee_server?: ServerName | null;
  /** Synapse's `proactively_send` internal flag. */
  proactively_send?: boolean;
  /** An out-of-band membership (outlier invite, rejection, knock): never sent. */
  out_of_band?: boolean;
  /** Sent on behalf of this server, which is then not sent the event itself. */
  send_on_behalf_of?: ServerName | null;
  /** When our server received the event (Unix ms); read-receipt rules use it. */
  received_ts?: number | null;
  /** The event in federation format, exactly as it goes into a transaction. */
  pdu: Json;
};

/** A forward extremity offered for catch-up. */
export type Extremity = {
  /** The event id. */
  event_id: string;
  /** Its stream ordering. */
  stream_ordering: number;
  /**
   * Whether the destination may see it (server-level history visibility; false for
   * erased senders and for remote events in partial-state rooms).
   */
  visible: boolean;
  /** The event in federation format. */
  pdu: Json;
};

/**
 * One room owed to a destination, as found by a catch-up query (sender-owned
 * `destination_rooms` joined with homeserver-owned event data).
 */
export type CatchUpRoom = {
  /** The room. */
  room_id: string;
  /** The `destination_rooms` stream ordering for (destination, room). */
  stream_ordering: number;
  /** The event at that stream ordering. */
  event_id: string;
  /** That event in federation format (redactions applied). */
  pdu: Json;
  /** The room is partial-state on our side: extremities cannot be judged. */
  partial_state?: boolean;
  /** Up to 10 current forward extremities of the room, highest depth first. */
  extremities?: Array<Extremity>;
  /**
   * Set by a host that cannot hand over the event (unreadable, or nested deeper than any
   * parser on the way accepts; `pdu` is then `{}`): the machine gives it up with this
   * reason, so the destination's catch-up moves past it instead of waiting forever.
   */
  undeliverable?: string | null;
};

/** Stored state of one destination (the `destinations` table). */
export type DestinationState = {
  /** The destination. */
  destination: ServerName;
  /** Time of the last failed attempt (Unix ms), 0 when healthy. */
  retry_last_ts?: number;
  /** Current backoff interval (ms), 0 when healthy. */
  retry_interval?: number;
  /** First failure of the current outage, null when healthy. */
  failure_ts?: number | null;
  /**
   * Highest stream ordering known delivered: every `destination_rooms` row at or below it
   * has been sent. Null when nothing was ever delivered.
   */
  last_successful_stream_ordering?: number | null;
};

/** A `destination_rooms` row: the newest local event in `room` owed to `destination`. */
export type DestinationRoom = {
  /** The destination. */
  destination: ServerName;
  /** The room. */
  room_id: string;
  /** Stream ordering of the newest event for that pair. */
  stream_ordering: number;
};

/** A to-device EDU waiting in the durable outbox for its destination. */
export type OutboxRow = {
  /** Where it goes. */
  destination: ServerName;
  /** Unique, increasing id (`incarnation × 2^32 + counter`): the order of sending. */
  outbox_id: number;
  /** When it was queued (Unix ms), for pruning (D14). */
  queued_ts: number;
  /** The whole EDU, `{"content":…,"edu_type":"m.direct_to_device"}`. */
  edu: Json;
};

/** Identifies an outbox row. */
export type OutboxKey = {
  /** The destination. */
  destination: ServerName;
  /** The row. */
  outbox_id: number;
};

/**
 * A device-list change owed to one destination, durable until delivered (Synapse's
 * `device_lists_outbound_pokes`, collapsed: one row per (destination, user, device)).
 */
export type DeviceListPoke = {
  /** Where it goes. */
  destination: ServerName;
  /** The local user. */
  user_id: string;
  /** The device; `None` for the user's cross-signing keys. */
  device_id: string | null;
  /** Position in the homeserver's device-list stream. */
  stream_id: number;
  /** When it was queued (Unix ms), for pruning. */
  queued_ts: number;
  /**
   * The EDU content without `prev_id` (added when the EDU is built): for a device
   * `{user_id, device_id, stream_id, deleted?, keys?, device_display_name?}`, for
   * cross-signing keys `{user_id, master_key?, self_signing_key?}`.
   */
  content: Json;
};

/** Identifies the version of a [`DeviceListPoke`] that was delivered or given up. */
export type DeviceListPokeKey = {
  /** The destination. */
  destination: ServerName;
  /** The user. */
  user_id: string;
  /** The device; `None` for cross-signing keys. */
  device_id: string | null;
  /**
   * The row is deleted only if its stream id is at most this: a newer change that
   * replaced it meanwhile stays.
   */
  stream_id: number;
};

/**
 * The newest device-list stream id a destination acknowledged for a user: the `prev_id` of
 * the next `m.device_list_update` EDU for that user.
 */
export type DeviceListPosition = {
  /** The destination. */
  destination: ServerName;
  /** The user. */
  user_id: string;
  /**
   * The stream id; `None` deletes the row, so the next EDU has an empty `prev_id` and
   * the destination resynchronises the user's whole device list.
   */
  stream_id: number | null;
};

/**
 * One atomic batch of writes to sender-owned storage.
 *
 * Hosts apply a batch all-or-nothing, and batches in the order they are emitted.
 * `incarnation`, `events_out_pos` and `destination_rooms` only ever grow, so hosts apply them
 * as *max*-upserts (keep the larger value); `destinations` rows are plain upserts of the
 * whole row. A batch that failed is issued again later, after newer ones: the max-upserts
 * make that safe, and the machine rewrites the `destinations` rows of a re-issued batch from
 * its current state (docs/design.md, "The storage boundary").
 */
export type Changes = {
  /**
   * The sender's incarnation counter (transaction ids and outbox ids embed it). Every
   * batch carries it until one carrying it is durable.
   */
  incarnation?: number;
  /** Position in the events stream up to which fan-out is durable. */
  events_out_pos?: number;
  /**
   * `destination_rooms` upserts. A row for an unknown destination creates a bare
   * `destinations` row for it.
   */
  destination_rooms?: Array<DestinationRoom>;
  /** Whole-row upserts of `destinations`. */
  destinations?: Array<DestinationState>;
  /** New rows of the to-device outbox. */
  to_device_outbox?: Array<OutboxRow>;
  /** Outbox rows delivered (or pruned), to delete: (destination, outbox id). */
  to_device_deleted?: Array<OutboxKey>;
  /**
   * Device-list pokes to upsert by (destination, user, device), keeping the row with the
   * higher `stream_id`.
   */
  device_list_pokes?: Array<DeviceListPoke>;
  /**
   * Pokes delivered or given up: delete the (destination, user, device) row if its
   * stream id is at most the given one.
   */
  device_list_pokes_deleted?: Array<DeviceListPokeKey>;
  /**
   * Whole-row upserts (or deletions) of the per (destination, user) acknowledged
   * position, applied in order.
   */
  device_list_positions?: Array<DeviceListPosition>;
};

/** What the host loaded from sender-owned storage at start-up. */
export type Recovered = {
  /**
   * The last persisted incarnation (0 if none). The machine persists `incarnation + 1`
   * before it sends anything, so transaction ids never repeat across restarts.
   */
  incarnation?: number;
  /**
   * Events-stream position up to which fan-out is durable; fan-out resumes after it.
   * None on a fresh install: the host should then set it to its current stream position
   * unless it wants all history sent.
   */
  events_out_pos?: number | null;
  /** Every stored `destinations` row. */
  destinations?: Array<DestinationState>;
  /** Every row of the to-device outbox, in any order. */
  to_device_outbox?: Array<OutboxRow>;
  /** Every device-list poke not yet delivered, in any order. */
  device_list_pokes?: Array<DeviceListPoke>;
  /** Every stored (destination, user) device-list position, in any order. */
  device_list_positions?: Array<DeviceListPosition>;
};

/**
 * One HTTP attempt of a transaction. Retries of a frozen transaction carry the same
 * `txn_id` and a byte-identical `body`.
 */
export type OutgoingTransaction = {
  /** Correlates the answer. */
  request: RequestId;
  /** Where to send it. */
  destination: ServerName;
  /** The transaction id for the URL path. */
  txn_id: string;
  /** Attempt number of this transaction, starting at 1. */
  attempt: number;
  /** Event ids of the PDUs, in body order. */
  pdu_ids: Array<string>;
  /** The JSON body, keys in canonical order. */
  body: string;
};

/** What a destination is doing, at a glance (D12). */
export type DestinationPhase =
  | "idle"
  | "sending"
  | "retrying"
  | "backing_off"
  | "catching_up"
  | "gone";

/** Per-destination figures for operators (D12). */
export type DestinationStats = {
  /** The destination. */
  destination: ServerName;
  /** What it is doing. */
  state: DestinationPhase;
  /** PDUs held in memory for it (queued and in the frozen transaction). */
  queued_pdus: number;
  /** EDUs (and presence states, receipts) queued in memory for it. */
  queued_edus: number;
  /** Age of the oldest PDU held in memory for it. */
  oldest_pending_age_ms: number | null;
  /** A transaction is awaiting an answer. */
  in_flight: boolean;
  /** No attempt before this time unless woken. */
  backoff_until_ts: number | null;
  /** Storage may hold rows memory does not; they are sent first. */
  catching_up: boolean;
  /** Last 2xx from it during this process's life. */
  last_success_ts: number | null;
  /** Items given up for it (poison, oversized). */
  dropped_items: number;
  /** Current backoff interval. */
  retry_interval_ms: number;
  /** First failure of the current outage. */
  failure_ts: number | null;
  /** Highest stream ordering known delivered. */
  last_successful_stream_ordering: number | null;
};

/** The outcome of one HTTP attempt of a transaction. */
export type TransactionResult =
  | {
      "outcome": "ok";
      /** Event id to error text, from the response's `pdus` object. */
      pdu_errors?: { [key in string]: string };
    }
  | {
      "outcome": "status";
      /** The HTTP status. */
      status: number;
      /** From a `Retry-After` header or a `retry_after_ms` body field, on 429/503. */
      retry_after_ms?: number | null;
      /** The Matrix `errcode`, if the body had one. */
      errcode?: string | null;
    }
  | { "outcome": "unreachable" }
  | { "outcome": "timeout" };

/** Something that happened, emitted as [`crate::Output::Event`]. */
export type Event =
  | {
      "event": "dropped";
      /** Who will not receive it. */
      destination: ServerName;
      /** An event id, or an EDU type. */
      item: string;
      /** Why it was given up. */
      reason: string;
    }
  | {
      "event": "pdu_errors";
      /** The destination. */
      destination: ServerName;
      /** The transaction. */
      txn_id: string;
      /** Event id to error text. */
      errors: { [key in string]: string };
    }
  | {
      "event": "backing_off";
      /** The destination. */
      destination: ServerName;
      /** The new backoff interval. */
      retry_interval_ms: number;
      /** No attempt before this time, unless woken. */
      until_ts: number;
    }
  | {
      "event": "destination_up";
      /** The destination. */
      destination: ServerName;
    }
  | {
      "event": "catch_up_started";
      /** The destination. */
      destination: ServerName;
    }
  | {
      "event": "catch_up_finished";
      /** The destination. */
      destination: ServerName;
    }
  | {
      "event": "event_skipped";
      /** The event. */
      event_id: string;
      /** Why. */
      reason: string;
    }
  | {
      "event": "storage_retry";
      /** What failed. */
      error: string;
      /** When it is retried. */
      retry_at_ts: number;
    };

/** Everything the host tells the machine. See the crate docs for the run-loop contract. */
export type Input =
  | {
      "type": "new_events";
      /** Highest stream ordering now persisted. */
      up_to: number;
    }
  | {
      "type": "wake_destination";
      /** The server to retry. */
      destination: ServerName;
    }
  | {
      "type": "remote_up";
      /** The server that contacted us. */
      destination: ServerName;
    }
  | {
      "type": "edu";
      /** Where it goes; ourselves is refused. */
      destination: ServerName;
      /** The EDU type. */
      edu_type: string;
      /** The EDU content. */
      content: Json;
      /** Replacement key, for keyed EDUs. */
      key?: string | null;
    }
  | {
      "type": "typing";
      /** The room. */
      room_id: string;
      /** The local user. */
      user_id: string;
      /** Typing or not. */
      typing: boolean;
      /** The servers in the room. */
      hosts: Array<ServerName>;
    }
  | {
      "type": "receipt";
      /** The receipt (one per room, type, user and thread: a newer one replaces). */
      receipt: Receipt;
      /** The servers in the room. */
      hosts: Array<ServerName>;
      /**
       * The receipted event's sender and arrival, if the homeserver knows the event; an
       * unknown event in a big room is treated as old (staggered to everyone).
       */
      event?: ReceiptedEvent | null;
    }
  | {
      "type": "to_device";
      /** The local sender. */
      sender: string;
      /** The event type (e.g. `m.room_key_request`). */
      message_type: string;
      /** Id of the message (chunks after the first get `.N`); generated when absent. */
      message_id?: string | null;
      /** Recipient user → device id (or `*`) → content. */
      messages: { [userId: string]: { [deviceId: string]: Json } };
    }
  | {
      "type": "presence";
      /** The states. */
      states: Array<PresenceState>;
      /** The servers interested in them. */
      destinations: Array<ServerName>;
    }
  | {
      "type": "device_list_update";
      /** The local user. */
      user_id: string;
      /** The device. */
      device_id: string;
      /**
       * Position in the homeserver's device-list stream; increases per user. An update not
       * newer than one already queued or delivered for the destination is ignored.
       */
      stream_id: number;
      /** The device is gone. */
      deleted?: boolean;
      /** The device's current keys (omitted for a deleted device). */
      keys?: Json;
      /** The device's display name, if the homeserver shares it over federation. */
      device_display_name?: string | null;
      /** The servers to tell. */
      destinations: Array<ServerName>;
    }
  | {
      "type": "signing_key_update";
      /** The local user. */
      user_id: string;
      /** Position in the homeserver's device-list stream. */
      stream_id: number;
      /** The new master key. */
      master_key?: Json;
      /** The new self-signing key. */
      self_signing_key?: Json;
      /** The servers to tell. */
      destinations: Array<ServerName>;
    }
  | {
      "type": "stored_to_device";
      /** The rows. */
      rows: Array<OutboxRow>;
    }
  | {
      "type": "stored_device_list_pokes";
      /** The pokes, with the content of their EDU minus `prev_id`. */
      pokes: Array<DeviceListPoke>;
    }
  | {
      "type": "set_destination_state";
      /** The new state. */
      state: DestinationState;
    }
  | {
      "type": "events_fetched";
      /** The request answered. */
      request: RequestId;
      /** The events with what fan-out needs to know about them. */
      events: Array<PduInfo>;
    }
  | {
      "type": "catch_up_loaded";
      /** The request answered. */
      request: RequestId;
      /** One entry per room, ascending by `stream_ordering`. */
      rooms: Array<CatchUpRoom>;
    }
  | {
      "type": "outstanding_loaded";
      /** The request answered. */
      request: RequestId;
      /** Destinations with catch-up work in storage. */
      destinations: Array<ServerName>;
    }
  | {
      "type": "persisted";
      /** The request answered. */
      request: RequestId;
    }
  | {
      "type": "storage_failed";
      /** The request answered. */
      request: RequestId;
      /** What went wrong, for logs. */
      error: string;
    }
  | {
      "type": "transaction_done";
      /** The request answered. */
      request: RequestId;
      /** The outcome of the attempt. */
      result: TransactionResult;
    }
  | { "type": "timeout" };

/** Everything the machine asks the host to do. */
export type Output =
  | { "type": "send_transaction" } & OutgoingTransaction
  | {
      "type": "fetch_events";
      /** Correlates the answer. */
      request: RequestId;
      /** Exclusive lower bound. */
      after: number;
      /** At most this many events. */
      limit: number;
    }
  | {
      "type": "load_catch_up";
      /** Correlates the answer. */
      request: RequestId;
      /** The destination being caught up. */
      destination: ServerName;
      /** Exclusive lower bound on stream ordering. */
      after: number;
      /** Inclusive upper bound: how far this process has fanned out. */
      up_to: number;
      /** At most this many rooms. */
      limit: number;
    }
  | {
      "type": "load_outstanding";
      /** Correlates the answer. */
      request: RequestId;
      /** Exclusive cursor. */
      after: ServerName | null;
      /** At most this many destinations. */
      limit: number;
    }
  | {
      "type": "persist";
      /** Correlates the answer. */
      request: RequestId;
      /** The writes. */
      changes: Changes;
    }
  | {
      "type": "event";
      /** What happened. */
      event: Event;
    };

/**
 * Configuration of a [`crate::FederationSender`].
 *
 * | key | default | meaning |
 * |---|---|---|
 * | `server_name` | required | our homeserver's name; events from other servers are never sent |
 * | `instance_name` | `"main"` | this sender's name among `instances` |
 * | `instances` | `["main"]` | all sender instances; destinations are sharded by SHA-256 (little-endian) of the name modulo their count |
 * | `seed` | `0` | seeds the PRNG behind every jitter |
 * | `retry_interval_min_ms` | 600 000 (10 min) | first per-destination backoff after a failed transaction |
 * | `retry_multiplier` | 2 | growth of the backoff per further failure, before jitter of ×0.8–1.4 |
 * | `retry_interval_max_ms` | 604 800 000 (7 days) | cap of the backoff |
 * | `catch_up_threshold_ms` | 3 600 000 (1 h) | a destination backed off for longer drops its in-memory queue and is caught up from storage; also the look-ahead of the retry filter |
 * | `rr_transactions_per_room_per_second` | 50 | staggering of low-priority wake-ups: at most one per 1/value seconds |
 * | `domain_whitelist` | `null` | if a list, only these servers get anything |
 * | `presence_enabled` | `true` | presence is sent only when enabled |
 * | `transactions_in_flight_max` | 128 | global cap on transactions awaiting an answer (D11) |
 * | `transaction_bytes_max` | 4 194 304 | cap on one transaction body (D8); an item too large on its own is dropped |
 * | `pdus_per_transaction_max` | 50 | at most 50 (spec) |
 * | `edus_per_transaction_max` | 100 | at most 100 (spec) |
 * | `http_retries_max` | 10 | retries of one transaction after a 5xx, 429, timeout or connection failure before the destination backs off |
 * | `http_retry_delay_max_ms` | 60 000 | cap of the delay before retry k, which is min(4^k s, cap) × jitter |
 * | `request_timeout_ms` | 60 000 | how long the transport waits for an answer (hosts enforce it; the core only documents it) |
 * | `poison_rejections_max` | 2 | after this many permanent rejections (4xx other than 401/408/429, or any 413) of one frozen transaction it is split to isolate the poison item (D7) |
 * | `pending_pdus_max` | 10 000 | PDUs held in memory per destination; beyond that the queue is dropped and the destination is caught up from storage, so memory stays bounded while a server is down |
 * | `to_device_prune_after_ms` | `null` (off) | to-device messages for a destination failing for longer than this are dropped (D14) |
 * | `device_list_prune_after_ms` | 86 400 000 (24 h) | a user with several device-list changes queued for one destination, the oldest queued longer ago than this, keeps only the newest and the destination resynchronises the user's list (Synapse's hourly pruning of outbound pokes); `null` turns it off |
 * | `events_batch_max` | 100 | events fetched per fan-out query |
 * | `catch_up_batch_max` | 50 | rooms fetched per catch-up query |
 * | `catch_up_waker_period_ms` | 60 000 | period of the scan for destinations with outstanding catch-up |
 * | `catch_up_waker_page_max` | 25 | destinations per page of that scan |
 * | `catch_up_waker_interval_ms` | 5 000 | pause between two destinations woken by the scan |
 */
export type Config = {
  server_name: ServerName;
  instance_name?: string;
  instances?: Array<string>;
  seed?: number;
  retry_interval_min_ms?: number;
  retry_multiplier?: number;
  retry_interval_max_ms?: number;
  catch_up_threshold_ms?: number;
  rr_transactions_per_room_per_second?: number;
  domain_whitelist?: Array<ServerName> | null;
  presence_enabled?: boolean;
  transactions_in_flight_max?: number;
  transaction_bytes_max?: number;
  pdus_per_transaction_max?: number;
  edus_per_transaction_max?: number;
  http_retries_max?: number;
  http_retry_delay_max_ms?: number;
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
};
