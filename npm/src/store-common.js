// What every store shares: checking a Changes batch before applying any of it, and the byte
// order the core sorts names in. A destination must be a server name as the core parses one
// (its own code, through wasm): the core never emits anything else, and the reference store
// (fedsend_driver::MemoryStore) refuses anything else, so every store refuses it the same way.

import { isServerName } from '../dist/fedsend_wasm.js';
import { CallbackError } from './errors.js';

/** Compares strings by Unicode code point, which is UTF-8 byte order (Rust's `str` order and
 * SQLite's BINARY collation); `<` on JS strings compares UTF-16 units and differs above U+FFFF. */
export function compareUtf8(a, b) {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(i);
    if (x !== y) return x < y ? -1 : 1;
    if (x > 0xffff) i++;
  }
  return a.length - b.length;
}

export function bareDestination(destination) {
  return {
    destination,
    retry_last_ts: 0,
    retry_interval: 0,
    failure_ts: null,
    last_successful_stream_ordering: null,
  };
}

const whole = (v) => Number.isSafeInteger(v) && v >= 0;
const wholeOrNull = (v) => v === null || v === undefined || whole(v);

function fail(what) {
  throw new CallbackError('store.applyChanges', `malformed changes: ${what}`);
}

/** Throws unless `changes` is a well-formed batch (the shapes of core/src/io.rs `Changes`). */
export function checkChanges(changes) {
  if (changes === null || typeof changes !== 'object') fail('not an object');
  if (!wholeOrNull(changes.incarnation)) fail('incarnation');
  if (!wholeOrNull(changes.events_out_pos)) fail('events_out_pos');
  for (const key of [
    'destination_rooms',
    'destinations',
    'to_device_outbox',
    'to_device_deleted',
    'device_list_pokes',
    'device_list_pokes_deleted',
    'device_list_positions',
  ]) {
    if (changes[key] !== undefined && !Array.isArray(changes[key])) fail(`${key} is not an array`);
  }
  for (const r of changes.destination_rooms ?? []) {
    if (!isDestination(r) || typeof r.room_id !== 'string' || !whole(r.stream_ordering)) {
      fail('a destination_rooms row');
    }
  }
  for (const r of changes.destinations ?? []) {
    if (
      !isDestination(r) ||
      !wholeOrNull(r.retry_last_ts) ||
      !wholeOrNull(r.retry_interval) ||
      !wholeOrNull(r.failure_ts) ||
      !wholeOrNull(r.last_successful_stream_ordering)
    ) {
      fail('a destinations row');
    }
  }
  for (const r of changes.to_device_outbox ?? []) {
    if (!isDestination(r) || !whole(r.outbox_id) || !whole(r.queued_ts) || r.edu === undefined) {
      fail('a to_device_outbox row');
    }
  }
  for (const r of changes.to_device_deleted ?? []) {
    if (!isDestination(r) || !whole(r.outbox_id)) fail('a to_device_deleted key');
  }
  for (const r of changes.device_list_pokes ?? []) {
    if (!isPokeKey(r) || !whole(r.queued_ts) || r.content === undefined) fail('a device_list_pokes row');
  }
  for (const r of changes.device_list_pokes_deleted ?? []) {
    if (!isPokeKey(r)) fail('a device_list_pokes_deleted key');
  }
  for (const r of changes.device_list_positions ?? []) {
    if (!isDestination(r) || typeof r.user_id !== 'string' || !wholeOrNull(r.stream_id)) {
      fail('a device_list_positions row');
    }
  }
}

function isDestination(row) {
  return typeof row?.destination === 'string' && isServerName(row.destination);
}

// device_id is null (or absent) for a user's cross-signing keys.
function isPokeKey(r) {
  return (
    isDestination(r) &&
    typeof r.user_id === 'string' &&
    (r.device_id == null || typeof r.device_id === 'string') &&
    whole(r.stream_id)
  );
}

/** Orders device-list pokes as the reference store does: destination, user, then device with
 * the cross-signing keys (null) first. */
export function comparePokes(a, b) {
  return (
    compareUtf8(a.destination, b.destination) ||
    compareUtf8(a.user_id, b.user_id) ||
    (a.device_id === b.device_id ? 0 : a.device_id === null ? -1 : b.device_id === null ? 1 : compareUtf8(a.device_id, b.device_id))
  );
}
