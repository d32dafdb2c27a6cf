// The default store: sender-owned state in memory (lost with the process). Semantics mirror
// sim/src/store.rs, the reference every store follows: `incarnation`, `events_out_pos` and
// `destination_rooms` are max-upserts, `destinations` rows whole-row upserts, a
// destination_rooms row for an unknown destination creates a bare destinations row, a
// device-list poke replaces a stored one only with a higher stream id and is deleted only if
// not newer than the key given, device-list positions are upserted or (null) deleted in
// order, and a batch applies all-or-nothing.

import { checkChanges, compareUtf8, comparePokes, bareDestination } from './store-common.js';

// (destination, user, device|null) and (destination, user) as Map keys.
const pokeKey = (r) => JSON.stringify([r.destination, r.user_id, r.device_id ?? null]);
const positionKey = (r) => JSON.stringify([r.destination, r.user_id]);

export class MemoryStore {
  #incarnation = 0;
  #eventsOutPos = null;
  #destinations = new Map(); // destination → DestinationState
  #destinationRooms = new Map(); // destination → Map(room_id → stream_ordering)
  #outbox = new Map(); // destination → Map(outbox_id → OutboxRow)
  #pokes = new Map(); // pokeKey → DeviceListPoke
  #positions = new Map(); // positionKey → DeviceListPosition (stream_id never null)

  loadRecovered() {
    return {
      incarnation: this.#incarnation,
      events_out_pos: this.#eventsOutPos,
      destinations: [...this.#destinations.values()]
        .sort((a, b) => compareUtf8(a.destination, b.destination))
        .map((row) => ({ ...row })),
      to_device_outbox: [...this.#outbox.values()].flatMap((rows) => [...rows.values()]).map((row) => structuredClone(row)),
      device_list_pokes: [...this.#pokes.values()].sort(comparePokes).map((row) => structuredClone(row)),
      device_list_positions: [...this.#positions.values()]
        .sort((a, b) => compareUtf8(a.destination, b.destination) || compareUtf8(a.user_id, b.user_id))
        .map((row) => ({ ...row })),
    };
  }

  applyChanges(changes) {
    // Validated in full before anything changes, so a bad batch leaves the store as it was.
    checkChanges(changes);
    if (changes.incarnation != null) this.#incarnation = Math.max(this.#incarnation, changes.incarnation);
    if (changes.events_out_pos != null) {
      this.#eventsOutPos = Math.max(this.#eventsOutPos ?? changes.events_out_pos, changes.events_out_pos);
    }
    for (const { destination, room_id, stream_ordering } of changes.destination_rooms ?? []) {
      if (!this.#destinations.has(destination)) this.#destinations.set(destination, bareDestination(destination));
      let rooms = this.#destinationRooms.get(destination);
      if (!rooms) this.#destinationRooms.set(destination, (rooms = new Map()));
      rooms.set(room_id, Math.max(rooms.get(room_id) ?? 0, stream_ordering));
    }
    for (const row of changes.destinations ?? []) {
      this.#destinations.set(row.destination, { ...bareDestination(row.destination), ...row });
    }
    for (const row of changes.to_device_outbox ?? []) {
      let rows = this.#outbox.get(row.destination);
      if (!rows) this.#outbox.set(row.destination, (rows = new Map()));
      rows.set(row.outbox_id, structuredClone(row));
    }
    for (const { destination, outbox_id } of changes.to_device_deleted ?? []) {
      const rows = this.#outbox.get(destination);
      rows?.delete(outbox_id);
      if (rows?.size === 0) this.#outbox.delete(destination);
    }
    for (const row of changes.device_list_pokes ?? []) {
      const key = pokeKey(row);
      const stored = this.#pokes.get(key);
      if (!stored || stored.stream_id < row.stream_id) {
        const { destination, user_id, device_id, stream_id, queued_ts, content } = row;
        this.#pokes.set(key, structuredClone({ destination, user_id, device_id: device_id ?? null, stream_id, queued_ts, content }));
      }
    }
    for (const done of changes.device_list_pokes_deleted ?? []) {
      const key = pokeKey(done);
      if (this.#pokes.get(key)?.stream_id <= done.stream_id) this.#pokes.delete(key);
    }
    for (const { destination, user_id, stream_id } of changes.device_list_positions ?? []) {
      const key = positionKey({ destination, user_id });
      if (stream_id == null) this.#positions.delete(key);
      else this.#positions.set(key, { destination, user_id, stream_id });
    }
  }

  catchUpRows({ destination, after, up_to, limit }) {
    const rows = [];
    for (const [room_id, stream_ordering] of this.#destinationRooms.get(destination) ?? []) {
      if (stream_ordering > after && stream_ordering <= up_to) rows.push({ room_id, stream_ordering });
    }
    rows.sort((a, b) => a.stream_ordering - b.stream_ordering || compareUtf8(a.room_id, b.room_id));
    return rows.slice(0, limit);
  }

  loadOutstanding({ after, limit }) {
    const names = new Set(this.#outbox.keys());
    for (const [destination, rooms] of this.#destinationRooms) {
      const delivered = this.#destinations.get(destination)?.last_successful_stream_ordering ?? 0;
      for (const stream of rooms.values()) {
        if (stream > delivered) {
          names.add(destination);
          break;
        }
      }
    }
    return [...names]
      .filter((name) => after == null || compareUtf8(name, after) > 0)
      .sort(compareUtf8)
      .slice(0, limit);
  }
}
