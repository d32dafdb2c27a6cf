// A persistent store for Node on better-sqlite3 (a peer dependency, loaded only by `open`):
// the same semantics as MemoryStore (fedsend_driver::MemoryStore, driver/src/memory_store.rs, is the reference), durable. Each batch
// is one SQLite transaction with synchronous=FULL, so a batch the sender was told is
// persisted survives a crash of the process or the machine.
//
// The schema has no version number: every table is created with IF NOT EXISTS, so a file
// written by an older version of this package gains the device-list tables on open and
// keeps its other rows.

import { checkChanges, compareUtf8 } from './store-common.js';
import { ConfigError, describe } from './errors.js';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS fedsend_meta (
  key TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS fedsend_destinations (
  destination TEXT PRIMARY KEY,
  retry_last_ts INTEGER NOT NULL,
  retry_interval INTEGER NOT NULL,
  failure_ts INTEGER,
  last_successful_stream_ordering INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS fedsend_destination_rooms (
  destination TEXT NOT NULL,
  room_id TEXT NOT NULL,
  stream_ordering INTEGER NOT NULL,
  PRIMARY KEY (destination, room_id)
) STRICT;
CREATE INDEX IF NOT EXISTS fedsend_destination_rooms_by_stream
  ON fedsend_destination_rooms (destination, stream_ordering);
CREATE TABLE IF NOT EXISTS fedsend_to_device_outbox (
  destination TEXT NOT NULL,
  outbox_id INTEGER NOT NULL,
  queued_ts INTEGER NOT NULL,
  edu TEXT NOT NULL,
  PRIMARY KEY (destination, outbox_id)
) STRICT;
-- One row per (destination, user, device). SQLite treats NULLs as distinct in a key, so a
-- user's cross-signing keys (device_id null in the API) are stored as is_device = 0 with
-- device_id '' rather than as NULL.
CREATE TABLE IF NOT EXISTS fedsend_device_list_pokes (
  destination TEXT NOT NULL,
  user_id TEXT NOT NULL,
  is_device INTEGER NOT NULL,
  device_id TEXT NOT NULL,
  stream_id INTEGER NOT NULL,
  queued_ts INTEGER NOT NULL,
  content TEXT NOT NULL,
  PRIMARY KEY (destination, user_id, is_device, device_id)
) STRICT;
CREATE TABLE IF NOT EXISTS fedsend_device_list_positions (
  destination TEXT NOT NULL,
  user_id TEXT NOT NULL,
  stream_id INTEGER NOT NULL,
  PRIMARY KEY (destination, user_id)
) STRICT;
`;

export class SqliteStore {
  #db;
  #statements;
  #apply;

  /**
   * Opens (creating if needed) the store in the SQLite file at `path` with better-sqlite3,
   * which must be installed next to this package.
   */
  static async open(path) {
    if (typeof path !== 'string' || path === '') throw new ConfigError('SqliteStore.open: path must be a non-empty string');
    let Database;
    try {
      ({ default: Database } = await import('better-sqlite3'));
    } catch (e) {
      throw new ConfigError(`SqliteStore needs the better-sqlite3 package (npm install better-sqlite3@12): ${describe(e)}`);
    }
    return new SqliteStore(new Database(path));
  }

  /** Uses an open better-sqlite3 Database (e.g. the homeserver's own); tables are prefixed `fedsend_`. */
  constructor(db) {
    if (!db || typeof db.prepare !== 'function' || typeof db.transaction !== 'function') {
      throw new ConfigError('SqliteStore: expected a better-sqlite3 Database');
    }
    this.#db = db;
    db.pragma('journal_mode = WAL');
    // An acknowledged batch must survive power loss, not just a process crash.
    db.pragma('synchronous = FULL');
    db.exec(SCHEMA);
    const s = (sql) => db.prepare(sql);
    this.#statements = {
      metaMax: s(`INSERT INTO fedsend_meta (key, value) VALUES (?, ?)
                  ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)`),
      metaGet: s('SELECT value FROM fedsend_meta WHERE key = ?'),
      bareDestination: s(`INSERT OR IGNORE INTO fedsend_destinations
                          (destination, retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering)
                          VALUES (?, 0, 0, NULL, NULL)`),
      roomMax: s(`INSERT INTO fedsend_destination_rooms (destination, room_id, stream_ordering) VALUES (?, ?, ?)
                  ON CONFLICT (destination, room_id) DO UPDATE SET stream_ordering = max(stream_ordering, excluded.stream_ordering)`),
      destinationUpsert: s(`INSERT OR REPLACE INTO fedsend_destinations
                            (destination, retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering)
                            VALUES (?, ?, ?, ?, ?)`),
      outboxInsert: s(`INSERT OR REPLACE INTO fedsend_to_device_outbox (destination, outbox_id, queued_ts, edu)
                       VALUES (?, ?, ?, ?)`),
      outboxDelete: s('DELETE FROM fedsend_to_device_outbox WHERE destination = ? AND outbox_id = ?'),
      pokeUpsert: s(`INSERT INTO fedsend_device_list_pokes
                     (destination, user_id, is_device, device_id, stream_id, queued_ts, content)
                     VALUES (?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (destination, user_id, is_device, device_id) DO UPDATE SET
                       stream_id = excluded.stream_id, queued_ts = excluded.queued_ts, content = excluded.content
                     WHERE excluded.stream_id > fedsend_device_list_pokes.stream_id`),
      pokeDelete: s(`DELETE FROM fedsend_device_list_pokes
                     WHERE destination = ? AND user_id = ? AND is_device = ? AND device_id = ? AND stream_id <= ?`),
      positionUpsert: s(`INSERT OR REPLACE INTO fedsend_device_list_positions (destination, user_id, stream_id)
                         VALUES (?, ?, ?)`),
      positionDelete: s('DELETE FROM fedsend_device_list_positions WHERE destination = ? AND user_id = ?'),
      pokes: s(`SELECT destination, user_id, is_device, device_id, stream_id, queued_ts, content
                FROM fedsend_device_list_pokes ORDER BY destination, user_id, is_device, device_id`),
      positions: s('SELECT destination, user_id, stream_id FROM fedsend_device_list_positions ORDER BY destination, user_id'),
      destinations: s('SELECT * FROM fedsend_destinations ORDER BY destination'),
      outbox: s('SELECT * FROM fedsend_to_device_outbox ORDER BY destination, outbox_id'),
      catchUp: s(`SELECT room_id, stream_ordering FROM fedsend_destination_rooms
                  WHERE destination = ? AND stream_ordering > ? AND stream_ordering <= ?
                  ORDER BY stream_ordering, room_id LIMIT ?`),
      outstanding: s(`SELECT destination FROM (
                        SELECT DISTINCT r.destination FROM fedsend_destination_rooms r
                          LEFT JOIN fedsend_destinations d ON d.destination = r.destination
                          WHERE r.stream_ordering > coalesce(d.last_successful_stream_ordering, 0)
                        UNION
                        SELECT DISTINCT destination FROM fedsend_to_device_outbox)
                      WHERE @after IS NULL OR destination > @after
                      ORDER BY destination LIMIT @limit`),
    };
    this.#apply = db.transaction((changes) => {
      const st = this.#statements;
      if (changes.incarnation != null) st.metaMax.run('incarnation', changes.incarnation);
      if (changes.events_out_pos != null) st.metaMax.run('events_out_pos', changes.events_out_pos);
      for (const r of changes.destination_rooms ?? []) {
        st.bareDestination.run(r.destination);
        st.roomMax.run(r.destination, r.room_id, r.stream_ordering);
      }
      for (const r of changes.destinations ?? []) {
        st.destinationUpsert.run(
          r.destination,
          r.retry_last_ts ?? 0,
          r.retry_interval ?? 0,
          r.failure_ts ?? null,
          r.last_successful_stream_ordering ?? null,
        );
      }
      for (const r of changes.to_device_outbox ?? []) {
        st.outboxInsert.run(r.destination, r.outbox_id, r.queued_ts, JSON.stringify(r.edu));
      }
      for (const k of changes.to_device_deleted ?? []) st.outboxDelete.run(k.destination, k.outbox_id);
      for (const r of changes.device_list_pokes ?? []) {
        st.pokeUpsert.run(r.destination, r.user_id, ...deviceColumns(r), r.stream_id, r.queued_ts, JSON.stringify(r.content));
      }
      for (const k of changes.device_list_pokes_deleted ?? []) {
        st.pokeDelete.run(k.destination, k.user_id, ...deviceColumns(k), k.stream_id);
      }
      // In order: a later row for the same (destination, user) wins, a null one deletes.
      for (const r of changes.device_list_positions ?? []) {
        if (r.stream_id == null) st.positionDelete.run(r.destination, r.user_id);
        else st.positionUpsert.run(r.destination, r.user_id, r.stream_id);
      }
    });
  }

  loadRecovered() {
    const st = this.#statements;
    return {
      incarnation: st.metaGet.get('incarnation')?.value ?? 0,
      events_out_pos: st.metaGet.get('events_out_pos')?.value ?? null,
      destinations: st.destinations.all().map((r) => ({ ...r })),
      to_device_outbox: st.outbox.all().map((r) => ({ ...r, edu: JSON.parse(r.edu) })),
      device_list_pokes: st.pokes.all().map(({ destination, user_id, is_device, device_id, stream_id, queued_ts, content }) => ({
        destination,
        user_id,
        device_id: is_device ? device_id : null,
        stream_id,
        queued_ts,
        content: JSON.parse(content),
      })),
      device_list_positions: st.positions.all().map((r) => ({ ...r })),
    };
  }

  applyChanges(changes) {
    checkChanges(changes);
    this.#apply(changes);
  }

  catchUpRows({ destination, after, up_to, limit }) {
    return this.#statements.catchUp.all(destination, after, up_to, limit);
  }

  loadOutstanding({ after, limit }) {
    // SQLite's BINARY collation is byte order, the same order compareUtf8 gives MemoryStore.
    return this.#statements.outstanding.all({ after: after ?? null, limit }).map((r) => r.destination);
  }

  /** Closes the database (only when this store opened it, or the caller is done with it). */
  close() {
    this.#db.close();
  }
}

// The (is_device, device_id) key columns of a poke whose device_id is null for cross-signing keys.
function deviceColumns({ device_id }) {
  return device_id == null ? [0, ''] : [1, device_id];
}

export { compareUtf8 };
