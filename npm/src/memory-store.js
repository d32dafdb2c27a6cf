// The default store: sender-owned state in memory (lost with the process). The tables and
// their semantics are fedsend_driver::MemoryStore's, the reference every store follows (the
// simulator, the core's tests and the bench use the same code): `incarnation`, `events_out_pos`
// and `destination_rooms` are max-upserts, `destinations` rows whole-row upserts, a
// destination_rooms row for an unknown destination creates a bare destinations row, a
// device-list poke replaces a stored one only with a higher stream id and is deleted only if
// not newer than the key given, device-list positions are upserted or (null) deleted in
// order, and a batch applies all-or-nothing. What stays here is the JavaScript API and the
// shape check every JavaScript store shares, so a bad batch gets the same CallbackError.

import { ReferenceMemoryStore } from '../dist/fedsend_wasm.js';
import { CallbackError } from './errors.js';
import { checkChanges } from './store-common.js';

const METHODS = ['loadRecovered', 'applyChanges', 'catchUpRows', 'loadOutstanding'];

let tablesOf;

/**
 * Another handle on the tables of a plain MemoryStore, for the driven sender to write to without
 * leaving wasm; undefined for any other store (a subclass, or one with a method replaced).
 */
export function sharedTables(store) {
  if (Object.getPrototypeOf(store) !== MemoryStore.prototype) return undefined;
  if (METHODS.some((name) => Object.hasOwn(store, name))) return undefined;
  return tablesOf(store).share();
}

export class MemoryStore {
  // Created on first use: the wasm module is instantiated by then (`init()` in a browser).
  #tables = null;

  static {
    tablesOf = (store) => store.#store;
  }

  get #store() {
    this.#tables ??= new ReferenceMemoryStore();
    return this.#tables;
  }

  loadRecovered() {
    return this.#store.loadRecovered();
  }

  applyChanges(changes) {
    // Validated in full before anything changes, so a bad batch leaves the store as it was.
    checkChanges(changes);
    try {
      this.#store.applyChanges(changes);
    } catch (e) {
      throw new CallbackError('store.applyChanges', `malformed changes: ${e.message}`, { cause: e });
    }
  }

  catchUpRows({ destination, after, up_to, limit }) {
    return this.#store.catchUpRows(destination, after, up_to, limit);
  }

  loadOutstanding({ after, limit }) {
    return this.#store.loadOutstanding(after ?? undefined, limit);
  }
}
