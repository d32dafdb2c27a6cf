// The store conformance suite against both stores.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { storeConformance } from './store-conformance.mjs';
import { fedsend, Database, tempDir } from './helpers.mjs';
import { SqliteStore } from '../src/sqlite.js';

storeConformance('MemoryStore', async () => ({ store: new fedsend.MemoryStore() }));

storeConformance('SqliteStore', async (t) => {
  const file = join(tempDir(t), 'fedsend.sqlite');
  const open = [];
  const make = () => {
    const store = new SqliteStore(new Database(file));
    open.push(store);
    return store;
  };
  t.after(() => open.forEach((s) => s.close()));
  const store = make();
  // reopen closes the first connection, as a restarted process would have.
  return { store, reopen: async () => (store.close(), open.splice(open.indexOf(store), 1), make()) };
});

test('SqliteStore: a file written before the device-list tables existed opens with its rows and gains them', async (t) => {
  const file = join(tempDir(t), 'old.sqlite');
  // The tables of the earlier schema that hold rows here (the others are created alike).
  const old = new Database(file);
  old.exec(`CREATE TABLE fedsend_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
            CREATE TABLE fedsend_to_device_outbox (destination TEXT NOT NULL, outbox_id INTEGER NOT NULL,
              queued_ts INTEGER NOT NULL, edu TEXT NOT NULL, PRIMARY KEY (destination, outbox_id)) STRICT;
            INSERT INTO fedsend_meta VALUES ('incarnation', 4);
            INSERT INTO fedsend_to_device_outbox VALUES ('b.test', 9, 1, '{"edu_type":"m.direct_to_device","content":{}}');`);
  old.close();
  const store = new SqliteStore(new Database(file));
  t.after(() => store.close());
  let r = store.loadRecovered();
  assert.equal(r.incarnation, 4);
  assert.equal(r.to_device_outbox.length, 1);
  assert.deepEqual([r.device_list_pokes, r.device_list_positions], [[], []]);
  store.applyChanges({ device_list_positions: [{ destination: 'b.test', user_id: '@u:a', stream_id: 2 }] });
  r = store.loadRecovered();
  assert.deepEqual(r.device_list_positions, [{ destination: 'b.test', user_id: '@u:a', stream_id: 2 }]);
});
