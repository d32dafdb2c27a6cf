// The store conformance suite: one set of cases, run against every store (store.test.mjs).
// The expected values follow driver/src/memory_store.rs (fedsend_driver::MemoryStore), the
// reference store in Rust, which the package's MemoryStore runs compiled to wasm.

import { test } from 'node:test';
import assert from 'node:assert/strict';

const dest = (destination, extra = {}) => ({
  destination,
  retry_last_ts: 0,
  retry_interval: 0,
  failure_ts: null,
  last_successful_stream_ordering: null,
  ...extra,
});

/**
 * @param {string} name
 * @param {(t) => Promise<{store, reopen?: () => Promise<any>}>} make  a fresh empty store;
 *   `reopen` returns a new store over the same durable state (persistent stores only)
 */
const poke = (destination, user_id, device_id, stream_id, content = {}) => ({
  destination,
  user_id,
  device_id,
  stream_id,
  queued_ts: 1000 + stream_id,
  content: { user_id, ...(device_id === null ? {} : { device_id, stream_id }), ...content },
});
const pokeKey = ({ destination, user_id, device_id }, stream_id) => ({ destination, user_id, device_id, stream_id });

export function storeConformance(name, make) {
  const check = (title, fn) => test(`${name}: ${title}`, async (t) => fn(await make(t), t));

  check('an empty store recovers the fresh-install state', async ({ store }) => {
    assert.deepEqual(await store.loadRecovered(), {
      incarnation: 0,
      events_out_pos: null,
      destinations: [],
      to_device_outbox: [],
      device_list_pokes: [],
      device_list_positions: [],
    });
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), []);
  });

  check('incarnation and events_out_pos are max-upserts', async ({ store }) => {
    await store.applyChanges({ incarnation: 3, events_out_pos: 10 });
    await store.applyChanges({ incarnation: 2, events_out_pos: 7 });
    let r = await store.loadRecovered();
    assert.equal(r.incarnation, 3);
    assert.equal(r.events_out_pos, 10);
    await store.applyChanges({ incarnation: 4 });
    r = await store.loadRecovered();
    assert.equal(r.incarnation, 4);
    assert.equal(r.events_out_pos, 10, 'an absent key leaves the value alone');
  });

  check('destination_rooms are max-upserts and create bare destinations rows', async ({ store }) => {
    await store.applyChanges({
      destination_rooms: [
        { destination: 'b.test', room_id: '!r1:a', stream_ordering: 5 },
        { destination: 'b.test', room_id: '!r2:a', stream_ordering: 3 },
      ],
    });
    await store.applyChanges({ destination_rooms: [{ destination: 'b.test', room_id: '!r1:a', stream_ordering: 4 }] });
    const r = await store.loadRecovered();
    assert.deepEqual(r.destinations, [dest('b.test')]);
    assert.deepEqual(await store.catchUpRows({ destination: 'b.test', after: 0, up_to: 100, limit: 10 }), [
      { room_id: '!r2:a', stream_ordering: 3 },
      { room_id: '!r1:a', stream_ordering: 5 },
    ]);
  });

  check('a bare row never overwrites an existing destinations row', async ({ store }) => {
    const row = dest('b.test', { retry_last_ts: 9, retry_interval: 600000, failure_ts: 8, last_successful_stream_ordering: 2 });
    await store.applyChanges({ destinations: [row] });
    await store.applyChanges({ destination_rooms: [{ destination: 'b.test', room_id: '!r:a', stream_ordering: 7 }] });
    assert.deepEqual((await store.loadRecovered()).destinations, [row]);
  });

  check('destinations rows are whole-row upserts (values may go down)', async ({ store }) => {
    await store.applyChanges({ destinations: [dest('c.test', { retry_interval: 1200000, failure_ts: 5, retry_last_ts: 6 })] });
    await store.applyChanges({ destinations: [dest('c.test', { last_successful_stream_ordering: 4 })] });
    await store.applyChanges({ destinations: [dest('a.test')] });
    assert.deepEqual((await store.loadRecovered()).destinations, [dest('a.test'), dest('c.test', { last_successful_stream_ordering: 4 })]);
  });

  check('catch-up rows: (after, up_to], ascending by stream then room, at most limit', async ({ store }) => {
    await store.applyChanges({
      destination_rooms: [
        { destination: 'b.test', room_id: '!z:a', stream_ordering: 4 },
        { destination: 'b.test', room_id: '!y:a', stream_ordering: 4 },
        { destination: 'b.test', room_id: '!x:a', stream_ordering: 2 },
        { destination: 'b.test', room_id: '!w:a', stream_ordering: 9 },
        { destination: 'other.test', room_id: '!v:a', stream_ordering: 3 },
      ],
    });
    assert.deepEqual(await store.catchUpRows({ destination: 'b.test', after: 2, up_to: 8, limit: 10 }), [
      { room_id: '!y:a', stream_ordering: 4 },
      { room_id: '!z:a', stream_ordering: 4 },
    ]);
    assert.deepEqual(await store.catchUpRows({ destination: 'b.test', after: 0, up_to: 9, limit: 2 }), [
      { room_id: '!x:a', stream_ordering: 2 },
      { room_id: '!y:a', stream_ordering: 4 },
    ]);
    assert.deepEqual(await store.catchUpRows({ destination: 'nobody.test', after: 0, up_to: 9, limit: 2 }), []);
  });

  check('outstanding: rows above the last successful position, or outbox rows; sorted, paged', async ({ store }) => {
    await store.applyChanges({
      destination_rooms: [
        { destination: 'd.test', room_id: '!r:a', stream_ordering: 5 },
        { destination: 'b.test', room_id: '!r:a', stream_ordering: 5 },
        { destination: 'c.test', room_id: '!r:a', stream_ordering: 5 },
      ],
      destinations: [dest('c.test', { last_successful_stream_ordering: 5 })],
      to_device_outbox: [{ destination: 'e.test', outbox_id: 1, queued_ts: 10, edu: { edu_type: 'm.direct_to_device', content: {} } }],
    });
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), ['b.test', 'd.test', 'e.test']);
    assert.deepEqual(await store.loadOutstanding({ after: 'b.test', limit: 1 }), ['d.test']);
    assert.deepEqual(await store.loadOutstanding({ after: 'e.test', limit: 10 }), []);
  });

  check('outstanding compares names in byte order, as the core sorts them', async ({ store }) => {
    // Server names are ASCII, where byte order is code-unit order: '1' < 'B' < '[' < 'a', and
    // '-' < '.' < ':' inside a name.
    const names = ['a.test', 'B.test', 'a.test:8448', 'a-b.test', '[::1]:8448', '1.2.3.4'];
    await store.applyChanges({
      destination_rooms: names.map((destination) => ({ destination, room_id: '!r:a', stream_ordering: 1 })),
    });
    const sorted = ['1.2.3.4', 'B.test', '[::1]:8448', 'a-b.test', 'a.test', 'a.test:8448'];
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), sorted);
    assert.deepEqual(await store.loadOutstanding({ after: 'a-b.test', limit: 10 }), ['a.test', 'a.test:8448']);
  });

  check('a batch naming something that is not a server name is refused whole', async ({ store }) => {
    // The core never emits such a row, and the reference store holds server names only; a
    // store that took one would answer loadOutstanding with a name the core refuses.
    await store.applyChanges({ destination_rooms: [{ destination: 'b.test', room_id: '!r:a', stream_ordering: 1 }] });
    const before = await store.loadRecovered();
    for (const destination of ['x\u{ffff}', 'x\u{10000}', '', 'a.test:0', 'under_score.test']) {
      await assert.rejects(
        async () =>
          store.applyChanges({
            incarnation: 7,
            destination_rooms: [
              { destination: 'c.test', room_id: '!r:a', stream_ordering: 2 },
              { destination, room_id: '!r:a', stream_ordering: 2 },
            ],
          }),
        (e) => e.name === 'CallbackError' && /malformed changes/.test(e.message),
        JSON.stringify(destination),
      );
    }
    assert.deepEqual(await store.loadRecovered(), before);
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), ['b.test']);
  });

  check('to-device outbox: insert, recover with the EDU intact, delete', async ({ store }) => {
    const edu = { content: { messages: { '@u:b.test': { DEV: { 'ünï': ['x', 1, null] } } }, message_id: 'm1', sender: '@s:a', type: 't' }, edu_type: 'm.direct_to_device' };
    const row1 = { destination: 'b.test', outbox_id: 2 ** 32 + 1, queued_ts: 100, edu };
    const row2 = { destination: 'b.test', outbox_id: 2 ** 32 + 2, queued_ts: 101, edu };
    await store.applyChanges({ to_device_outbox: [row1, row2] });
    let rows = (await store.loadRecovered()).to_device_outbox.sort((a, b) => a.outbox_id - b.outbox_id);
    assert.deepEqual(rows, [row1, row2]);
    await store.applyChanges({ to_device_deleted: [{ destination: 'b.test', outbox_id: row1.outbox_id }] });
    rows = (await store.loadRecovered()).to_device_outbox;
    assert.deepEqual(rows, [row2]);
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), ['b.test']);
    await store.applyChanges({ to_device_deleted: [{ destination: 'b.test', outbox_id: row2.outbox_id }] });
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), []);
  });

  check('a malformed batch is refused whole: nothing of it is applied', async ({ store }) => {
    await assert.rejects(
      async () =>
        store.applyChanges({
          incarnation: 5,
          destination_rooms: [{ destination: 'b.test', room_id: '!r:a', stream_ordering: 'soon' }],
        }),
      (e) => e.code === 'ERR_FEDSEND_CALLBACK' && /destination_rooms/.test(e.message),
    );
    assert.equal((await store.loadRecovered()).incarnation, 0);
    await assert.rejects(async () => store.applyChanges(null), /malformed changes/);
  });

  check('stored state survives a reopen (persistent stores)', async ({ store, reopen }, t) => {
    if (!reopen) return t.skip('in-memory store');
    const keysPoke = poke('b.test', '@u:a', null, 4, { master_key: { keys: { 'ed25519:m': 'k' } } });
    const row = { destination: 'b.test', outbox_id: 7, queued_ts: 1, edu: { edu_type: 'm.direct_to_device', content: { a: 1 } } };
    await store.applyChanges({
      incarnation: 2,
      events_out_pos: 42,
      destination_rooms: [{ destination: 'b.test', room_id: '!r:a', stream_ordering: 40 }],
      destinations: [dest('c.test', { last_successful_stream_ordering: 12 })],
      to_device_outbox: [row],
      device_list_pokes: [keysPoke],
      device_list_positions: [{ destination: 'b.test', user_id: '@u:a', stream_id: 3 }],
    });
    const again = await reopen();
    assert.deepEqual(await again.loadRecovered(), {
      incarnation: 2,
      events_out_pos: 42,
      destinations: [dest('b.test'), dest('c.test', { last_successful_stream_ordering: 12 })],
      to_device_outbox: [row],
      device_list_pokes: [keysPoke],
      device_list_positions: [{ destination: 'b.test', user_id: '@u:a', stream_id: 3 }],
    });
    assert.deepEqual(await again.catchUpRows({ destination: 'b.test', after: 0, up_to: 50, limit: 5 }), [
      { room_id: '!r:a', stream_ordering: 40 },
    ]);
  });

  check('device-list pokes: one row per (destination, user, device), the higher stream id wins', async ({ store }) => {
    const v5 = poke('b.test', '@u:a', 'D1', 5, { keys: { v: 5 } });
    const v3 = poke('b.test', '@u:a', 'D1', 3, { keys: { v: 3 } });
    const v7 = poke('b.test', '@u:a', 'D1', 7, { deleted: true });
    const keys = poke('b.test', '@u:a', null, 4, { self_signing_key: { usage: ['self_signing'] } });
    const other = [poke('c.test', '@u:a', 'D1', 2), poke('b.test', '@v:a', 'D1', 2), poke('b.test', '@u:a', 'D0', 2)];
    await store.applyChanges({ device_list_pokes: [v5, keys, ...other] });
    await store.applyChanges({ device_list_pokes: [v3] });
    let r = await store.loadRecovered();
    assert.deepEqual(r.device_list_pokes.find((p) => p.device_id === 'D1' && p.destination === 'b.test' && p.user_id === '@u:a'), v5, 'an older poke never replaces a newer one');
    await store.applyChanges({ device_list_pokes: [v5] });
    await store.applyChanges({ device_list_pokes: [v7, v3] });
    r = await store.loadRecovered();
    // Recovered in key order: destination, user, device with the cross-signing keys (null) first.
    assert.deepEqual(r.device_list_pokes, [keys, other[2], v7, other[1], other[0]]);
    assert.deepEqual(r.device_list_positions, []);
  });

  check('device-list pokes: a delete removes the row only if it is not newer than the key', async ({ store }) => {
    const v5 = poke('b.test', '@u:a', 'D1', 5);
    const keys = poke('b.test', '@u:a', null, 4, { master_key: {} });
    await store.applyChanges({ device_list_pokes: [v5, keys] });
    // Delivered version 4 of D1 while version 5 was queued: 5 stays. A key with device_id
    // 'D1' never matches the cross-signing row (null), and vice versa.
    await store.applyChanges({
      device_list_pokes_deleted: [pokeKey(v5, 4), pokeKey(keys, 3), pokeKey({ ...v5, device_id: 'D9' }, 99)],
    });
    assert.deepEqual((await store.loadRecovered()).device_list_pokes, [keys, v5]);
    await store.applyChanges({ device_list_pokes_deleted: [pokeKey(keys, 4)] });
    assert.deepEqual((await store.loadRecovered()).device_list_pokes, [v5]);
    await store.applyChanges({ device_list_pokes_deleted: [pokeKey(v5, 6)] });
    assert.deepEqual((await store.loadRecovered()).device_list_pokes, []);
    // In one batch, upserts apply before deletes (as the reference store does).
    const v8 = poke('b.test', '@u:a', 'D1', 8);
    await store.applyChanges({ device_list_pokes: [v8], device_list_pokes_deleted: [pokeKey(v8, 8)] });
    assert.deepEqual((await store.loadRecovered()).device_list_pokes, []);
  });

  check('device-list positions: upserts (values may go down) and null deletes, applied in order', async ({ store }) => {
    const pos = (destination, user_id, stream_id) => ({ destination, user_id, stream_id });
    await store.applyChanges({
      device_list_positions: [pos('b.test', '@u:a', 5), pos('b.test', '@u:a', 9), pos('c.test', '@u:a', 2), pos('b.test', '@v:a', 1)],
    });
    let r = await store.loadRecovered();
    assert.deepEqual(r.device_list_positions, [pos('b.test', '@u:a', 9), pos('b.test', '@v:a', 1), pos('c.test', '@u:a', 2)]);
    await store.applyChanges({
      device_list_positions: [pos('b.test', '@u:a', null), pos('b.test', '@u:a', 3), pos('c.test', '@u:a', null), pos('b.test', '@v:a', 7), pos('b.test', '@v:a', null), pos('d.test', '@x:a', null)],
    });
    r = await store.loadRecovered();
    assert.deepEqual(r.device_list_positions, [pos('b.test', '@u:a', 3)], 'a null deletes; a later row in the batch wins');
    assert.deepEqual(await store.loadOutstanding({ after: null, limit: 10 }), [], 'positions are not catch-up work');
  });

  check('malformed device-list rows refuse the whole batch', async ({ store }) => {
    const bad = [
      { device_list_pokes: [{ ...poke('b.test', '@u:a', 'D', 1), stream_id: -1 }] },
      { device_list_pokes: [{ ...poke('b.test', '@u:a', 'D', 1), content: undefined }] },
      { device_list_pokes: [{ ...poke('b.test', '@u:a', 'D', 1), device_id: 7 }] },
      { device_list_pokes_deleted: [{ destination: 'b.test', user_id: '@u:a', device_id: null }] },
      { device_list_positions: [{ destination: 'b.test', user_id: '@u:a', stream_id: '3' }] },
      { device_list_positions: {} },
    ];
    for (const changes of bad) {
      await assert.rejects(
        async () => store.applyChanges({ incarnation: 9, device_list_pokes: [poke('b.test', '@u:a', 'OK', 1)], ...changes }),
        (e) => e.code === 'ERR_FEDSEND_CALLBACK' && /device_list/.test(e.message),
        JSON.stringify(changes),
      );
    }
    const r = await store.loadRecovered();
    assert.equal(r.incarnation, 0);
    assert.deepEqual(r.device_list_pokes, []);
  });
}
