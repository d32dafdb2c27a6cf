// The driven FederationSender with fake callbacks and a virtual clock: delivery, timers,
// retries with backoff, request timeouts, restart over the persistent store.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { fedsend, FakeClock, Database, tempDir, settle } from './helpers.mjs';
import { World, ORIGIN } from './world.mjs';
import { SqliteStore } from '../src/sqlite.js';

const { FederationSender, TransportError } = fedsend;

async function startSender(world, clock, extra = {}) {
  const events = [];
  const errors = [];
  const sender = await FederationSender.start({
    config: { server_name: ORIGIN, ...extra.config },
    transport: world.transport,
    homeserver: world.homeserver,
    clock,
    onEvent: (e) => events.push(e),
    onError: (e) => errors.push(e),
    ...extra.options,
  });
  return { sender, events, errors };
}

test('a new event is fetched, fanned out and sent to the servers in the room', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender, errors } = await startSender(world, clock);
  world.addEvent('!room:a.test', [ORIGIN, 'b.test', 'c.test']);
  await sender.newEvents(1);
  await clock.advance(10);
  assert.deepEqual(world.sent.map((s) => s.destination).sort(), ['b.test', 'c.test']);
  const body = JSON.parse(world.sent[0].body);
  assert.equal(body.origin, ORIGIN);
  assert.deepEqual(body.pdus.map((p) => p.event_id), ['$e1']);
  assert.equal(world.sent[0].authorization, undefined, 'no signing key, no header');
  const stats = sender.destinationStats();
  assert.deepEqual(stats.map((s) => [s.destination, s.state, s.last_successful_stream_ordering]), [
    ['b.test', 'idle', 1],
    ['c.test', 'idle', 1],
  ]);
  assert.deepEqual(errors, []);
  await sender.close();
});

test('failed attempts are retried with growing delays, same txn id and body, then the destination backs off', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender, events } = await startSender(world, clock, {
    config: { http_retries_max: 2, retry_interval_min_ms: 600_000 },
  });
  world.script('b.test', { status: 500, body: '{"errcode":"M_UNKNOWN"}' });
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(1);
  assert.equal(world.sentTo('b.test').length, 1);
  await clock.advance(3000); // retry 1 waits 4 s × jitter 0.8–1.4 ≥ 3.2 s
  assert.equal(world.sentTo('b.test').length, 1, 'no retry before the first delay');
  await clock.advance(3000);
  assert.equal(world.sentTo('b.test').length, 2, 'retried after about 4 s');
  await clock.advance(10_000); // retry 2 waits 16 s × jitter ≥ 12.8 s after retry 1
  assert.equal(world.sentTo('b.test').length, 2);
  await clock.advance(12_000);
  const attempts = world.sentTo('b.test');
  assert.equal(attempts.length, 3);
  assert.deepEqual(attempts.map((a) => a.attempt), [1, 2, 3]);
  assert.equal(new Set(attempts.map((a) => a.txnId)).size, 1, 'one txn id');
  assert.equal(new Set(attempts.map((a) => a.body)).size, 1, 'byte-identical body');
  const backoff = events.find((e) => e.event === 'backing_off');
  assert.ok(backoff, 'retries exhausted: the destination backs off');
  assert.equal(sender.destinationStats()[0].state, 'backing_off');

  // Healthy again: nothing is sent before the backoff expires, then the event arrives.
  world.script('b.test', { status: 200, body: { pdus: {} } });
  await clock.advance(backoff.until_ts - clock.now() - 1000);
  assert.equal(world.sentTo('b.test').length, 3);
  await clock.advance(120_000);
  const last = world.sentTo('b.test').at(-1);
  assert.ok(world.sentTo('b.test').length > 3);
  assert.deepEqual(JSON.parse(last.body).pdus.map((p) => p.event_id), ['$e1']);
  assert.equal(sender.destinationStats()[0].state, 'idle');
  await sender.close();
});

test('transport failure kinds: thrown TransportError, {error}, Node error codes, 429 retry-after', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender, errors, events } = await startSender(world, clock);
  const pduErrors = events;
  const refused = Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
  world.script(
    'b.test',
    () => { throw new TransportError('unreachable'); },
    { error: 'timeout' },
    () => Promise.reject(refused),
    { status: 429, body: { errcode: 'M_LIMIT_EXCEEDED' }, retryAfterMs: 30_000 },
    { status: 200, body: { pdus: { $e1: { error: 'bad event' } } } },
  );
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(10 * 60_000);
  assert.equal(world.sentTo('b.test').length, 5);
  assert.deepEqual(errors, [], 'known failure kinds are not host errors');
  assert.equal(sender.destinationStats()[0].last_successful_stream_ordering, 1);
  assert.ok(pduErrors.some((e) => e.event === 'pdu_errors' && e.errors.$e1 === 'bad event'), 'per-PDU errors of a 2xx are reported');
  await sender.close();
});

test('429 with retryAfterMs delays the retry by at least that long', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender } = await startSender(world, clock);
  const at = [];
  world.script(
    'b.test',
    () => (at.push(clock.now()), { status: 429, body: {}, retryAfterMs: 45_000 }),
    () => (at.push(clock.now()), { status: 200, body: {} }),
  );
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(120_000);
  assert.equal(at.length, 2);
  assert.ok(at[1] - at[0] >= 45_000, `retried after ${at[1] - at[0]} ms`);
  await sender.close();
});

test('a transport that never answers times out after request_timeout_ms and is aborted', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender } = await startSender(world, clock, { config: { request_timeout_ms: 5_000 } });
  let signal;
  world.script('b.test', ({ signal: s }) => ((signal = s), new Promise(() => {})), { status: 200, body: {} });
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(4_000);
  assert.equal(world.sentTo('b.test').length, 1);
  assert.equal(signal.aborted, false);
  await clock.advance(1_500);
  assert.equal(signal.aborted, true, 'the hung request is aborted at its timeout');
  await clock.advance(60_000);
  assert.equal(world.sentTo('b.test').length, 2, 'and retried');
  assert.equal(sender.destinationStats()[0].last_successful_stream_ordering, 1);
  await sender.close();
});

test('a signing key adds an X-Matrix Authorization that verifies over the exact body', async () => {
  const world = new World();
  const clock = new FakeClock();
  const key = fedsend.SigningKey.fromSeedBytes('ed25519:k1', new Uint8Array(32).fill(7));
  const { sender } = await startSender(world, clock, { options: { signingKey: key } });
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(10);
  const [{ authorization, txnId, body }] = world.sent;
  const expected = fedsend.xMatrixAuthorization({
    origin: ORIGIN, destination: 'b.test', method: 'PUT', uri: `/_matrix/federation/v1/send/${txnId}`, content: JSON.parse(body), key,
  });
  assert.equal(authorization, expected);
  const sig = /sig="([^"]+)"/.exec(authorization)[1];
  fedsend.verifyJson(
    { method: 'PUT', uri: `/_matrix/federation/v1/send/${txnId}`, origin: ORIGIN, destination: 'b.test', content: JSON.parse(body), signatures: { [ORIGIN]: { 'ed25519:k1': sig } } },
    ORIGIN, 'ed25519:k1', key.publicKeyBase64,
  );
  await sender.close();
});

test('restart over SqliteStore: the outbox, positions and owed rooms survive; txn ids do not repeat', async (t) => {
  const file = join(tempDir(t), 'sender.sqlite');
  const world = new World();
  const clock = new FakeClock();
  world.script('b.test', { error: 'unreachable' });

  const store1 = new SqliteStore(new Database(file));
  const first = await startSender(world, clock, { options: { store: store1 } });
  world.addEvent();
  await first.sender.newEvents(1);
  let durable = false;
  const submitted = first.sender
    .sendToDevice({ sender: `@alice:${ORIGIN}`, message_type: 'm.test', message_id: 'msg-1', messages: { '@bob:b.test': { DEV: { hello: 'bob' } } } })
    .then(() => (durable = true));
  await submitted;
  assert.ok(durable);
  await clock.advance(30_000);
  assert.ok(world.sentTo('b.test').length >= 1, 'attempted while down');
  assert.ok(world.sentTo('b.test').every((s) => s.txnId.startsWith('1.')));
  await first.sender.close();
  store1.close();

  const store2 = new SqliteStore(new Database(file));
  t.after(() => store2.close());
  const recovered = store2.loadRecovered();
  assert.equal(recovered.incarnation, 1);
  assert.equal(recovered.events_out_pos, 1);
  assert.equal(recovered.to_device_outbox.length, 1);

  world.script('b.test', { status: 200, body: { pdus: {} } });
  const sentBefore = world.sent.length;
  world.fetches.length = 0;
  const second = await startSender(world, clock, { options: { store: store2 } });
  await clock.advance(5 * 60_000);
  const after = world.sent.slice(sentBefore);
  assert.ok(after.length >= 1);
  assert.ok(after.every((s) => s.txnId.startsWith('2.')), `new incarnation: ${after.map((s) => s.txnId)}`);
  const bodies = after.map((s) => JSON.parse(s.body));
  const edus = bodies.flatMap((b) => b.edus ?? []);
  const pdus = bodies.flatMap((b) => b.pdus ?? []);
  assert.deepEqual(edus.filter((e) => e.edu_type === 'm.direct_to_device').map((e) => e.content.message_id), ['msg-1']);
  assert.deepEqual(pdus.map((p) => p.event_id), ['$e1'], 'the owed event is caught up');
  assert.ok(world.fetches.every((f) => f.after >= 1), 'fan-out resumes after the stored position');
  assert.deepEqual(store2.loadRecovered().to_device_outbox, [], 'delivered rows are deleted');
  await second.sender.close();
});

// `store`, except that its first two writes carrying rows of `table` reject ("disk full").
function failingTwice(store, table) {
  return {
    failures: 0,
    loadRecovered: () => store.loadRecovered(),
    catchUpRows: (q) => store.catchUpRows(q),
    loadOutstanding: (q) => store.loadOutstanding(q),
    async applyChanges(changes) {
      if (changes[table]?.length && this.failures < 2) {
        this.failures++;
        throw new Error('disk full');
      }
      store.applyChanges(changes);
    },
  };
}

test('a rejected storage write is reported and retried until it lands; to-device waits for it', async () => {
  const world = new World();
  const clock = new FakeClock();
  const store = new fedsend.MemoryStore();
  const flaky = failingTwice(store, 'to_device_outbox');
  const { sender, errors, events } = await startSender(world, clock, { options: { store: flaky } });
  let durable = false;
  const done = sender
    .sendToDevice({ sender: `@alice:${ORIGIN}`, message_type: 'm.test', messages: { '@bob:b.test': { '*': {} } } })
    .then(() => (durable = true));
  await settle();
  assert.equal(durable, false, 'not acknowledged while the write fails');
  assert.equal(store.loadRecovered().to_device_outbox.length, 0);
  await clock.advance(60_000);
  await done;
  assert.equal(flaky.failures, 2);
  assert.equal(errors.filter((e) => e.code === 'ERR_FEDSEND_CALLBACK' && e.callback === 'store.applyChanges').length, 2);
  assert.match(errors[0].message, /disk full/);
  assert.ok(events.some((e) => e.event === 'storage_retry'));
  await sender.close();
});

test('commands from inside a callback run after the current step; to-device still waits for durability', async () => {
  const world = new World();
  const clock = new FakeClock();
  let inner = null;
  let sender;
  const { sender: s } = await startSender(world, clock, {
    config: { http_retries_max: 0 },
    options: {
      onEvent: (e) => {
        if (e.event === 'backing_off' && !inner) {
          // Re-entering from inside the drain: queued, not nested.
          inner = sender.sendToDevice({ sender: `@alice:${ORIGIN}`, message_type: 'm.t', messages: { '@carol:c.test': { D: {} } } });
          sender.sendEdu({ destination: 'c.test', edu_type: 'm.from_callback', content: {} });
        }
      },
    },
  });
  sender = s;
  world.script('b.test', { status: 500 });
  await sender.sendEdu({ destination: 'b.test', edu_type: 'm.x', content: {} });
  await clock.advance(100);
  assert.ok(inner, 'the callback ran');
  await inner;
  await clock.advance(100);
  const edus = world.sentTo('c.test').flatMap((t) => JSON.parse(t.body).edus ?? []).map((e) => e.edu_type).sort();
  assert.deepEqual(edus, ['m.direct_to_device', 'm.from_callback']);
  await sender.close();
});

test('410 Gone parks the destination until remoteUp(); then what it is owed is sent', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender } = await startSender(world, clock);
  world.script('b.test', { status: 410, body: { errcode: 'M_GONE' } });
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(10);
  assert.equal(sender.destinationStats()[0].state, 'gone');
  const attempts = world.sentTo('b.test').length;
  await clock.advance(24 * 3600_000);
  assert.equal(world.sentTo('b.test').length, attempts, 'nothing sent to a gone server');
  world.script('b.test', { status: 200, body: {} });
  await sender.remoteUp('b.test');
  await clock.advance(60_000);
  assert.ok(world.sentTo('b.test').length > attempts);
  assert.equal(sender.destinationStats()[0].last_successful_stream_ordering, 1);
  await sender.close();
});

test('firstStartEventsPosition: a fresh install does not send history; a stored position wins', async () => {
  const world = new World();
  const clock = new FakeClock();
  world.addEvent();
  world.addEvent();
  const store = new fedsend.MemoryStore();
  const first = await startSender(world, clock, { options: { store, firstStartEventsPosition: 2 } });
  await clock.advance(10);
  assert.deepEqual(world.fetches.map((f) => f.after), [2], 'fan-out starts after the given position');
  world.addEvent();
  await first.sender.newEvents(3);
  await clock.advance(10);
  assert.deepEqual(world.sent.flatMap((s) => JSON.parse(s.body).pdus.map((p) => p.event_id)), ['$e3']);
  await first.sender.close();
  world.fetches.length = 0;
  const second = await startSender(world, clock, { options: { store, firstStartEventsPosition: 0 } });
  await clock.advance(10);
  assert.deepEqual(world.fetches.map((f) => f.after), [3], 'the stored position is used');
  await second.sender.close();
});

// The m.device_list_update EDUs delivered to `destination`, in order.
function deviceListEdus(world, destination) {
  return world
    .sentTo(destination)
    .filter((s) => s.delivered)
    .flatMap((s) => JSON.parse(s.body).edus ?? [])
    .filter((e) => e.edu_type === 'm.device_list_update')
    .map((e) => e.content);
}

test('device-list updates: durable on resolve, survive a restart over SqliteStore, delivered with the prev_id chain', async (t) => {
  const file = join(tempDir(t), 'sender.sqlite');
  const world = new World();
  const clock = new FakeClock();
  // Marks the attempts the remote accepted, so only delivered EDUs are compared below.
  const down = () => ({ error: 'unreachable' });
  const up = (attempt) => {
    world.sent.find((s) => s.txnId === attempt.txnId && s.destination === attempt.destination && !s.delivered).delivered = true;
    return { status: 200, body: { pdus: {} } };
  };
  world.script('b.test', down);
  const user = `@alice:${ORIGIN}`;
  const keys = { user_id: user, device_id: 'PHONE', algorithms: ['m.olm.v1.curve25519-aes-sha2'], keys: { 'ed25519:PHONE': 'k1' } };

  const store1 = new SqliteStore(new Database(file));
  const first = await startSender(world, clock, { options: { store: store1 } });
  await first.sender.sendDeviceListUpdate({
    user_id: user,
    device_id: 'PHONE',
    stream_id: 10,
    keys,
    device_display_name: 'phone',
    destinations: [ORIGIN, 'b.test'],
  });
  // Resolved: the poke is in the file (ourselves excluded), before anything was sent.
  const queued = store1.loadRecovered().device_list_pokes;
  assert.deepEqual(
    queued.map((p) => [p.destination, p.user_id, p.device_id, p.stream_id]),
    [['b.test', user, 'PHONE', 10]],
  );
  assert.deepEqual(queued[0].content, { device_display_name: 'phone', device_id: 'PHONE', keys, stream_id: 10, user_id: user });
  await clock.advance(5 * 60_000);
  assert.ok(world.sentTo('b.test').length >= 1, 'attempted while the remote is down');
  assert.deepEqual(deviceListEdus(world, 'b.test'), []);
  await first.sender.close();
  store1.close();

  // A restart over the same file: the poke is sent once the remote answers.
  world.script('b.test', up);
  const store2 = new SqliteStore(new Database(file));
  const second = await startSender(world, clock, { options: { store: store2 } });
  await clock.advance(5 * 60_000);
  let delivered = deviceListEdus(world, 'b.test');
  assert.equal(delivered.length, 1, JSON.stringify(delivered));
  assert.deepEqual(delivered[0], { device_display_name: 'phone', device_id: 'PHONE', keys, prev_id: [], stream_id: 10, user_id: user });
  assert.deepEqual(store2.loadRecovered().device_list_pokes, [], 'a delivered poke is deleted');
  assert.deepEqual(store2.loadRecovered().device_list_positions, [{ destination: 'b.test', user_id: user, stream_id: 10 }]);

  // The next change chains to the acknowledged one.
  await second.sender.sendDeviceListUpdate({ user_id: user, device_id: 'PHONE', stream_id: 12, deleted: true, destinations: ['b.test'] });
  await clock.advance(5 * 60_000);
  delivered = deviceListEdus(world, 'b.test');
  assert.equal(delivered.length, 2);
  assert.deepEqual(delivered[1], { deleted: true, device_id: 'PHONE', prev_id: [10], stream_id: 12, user_id: user });
  await second.sender.close();
  store2.close();

  // And across another restart, from the stored position.
  const store3 = new SqliteStore(new Database(file));
  t.after(() => store3.close());
  const third = await startSender(world, clock, { options: { store: store3 } });
  await third.sender.sendDeviceListUpdate({ user_id: user, device_id: 'LAPTOP', stream_id: 15, keys: {}, destinations: ['b.test'] });
  await clock.advance(5 * 60_000);
  delivered = deviceListEdus(world, 'b.test');
  assert.equal(delivered.length, 3);
  assert.deepEqual(delivered[2].prev_id, [12]);
  assert.equal(delivered[2].device_id, 'LAPTOP');
  await third.sender.close();
});

test('signing-key updates go out as the stable and unstable EDU pair; a remote user is refused at once', async () => {
  const world = new World();
  const clock = new FakeClock();
  const { sender, errors } = await startSender(world, clock);
  const user = `@alice:${ORIGIN}`;
  const master_key = { user_id: user, usage: ['master'], keys: { 'ed25519:m': 'm' } };
  await sender.sendSigningKeyUpdate({ user_id: user, stream_id: 3, master_key, destinations: ['b.test'] });
  await clock.advance(5 * 60_000);
  const edus = world.sentTo('b.test').flatMap((s) => JSON.parse(s.body).edus ?? []);
  assert.deepEqual(
    edus.map((e) => e.edu_type).sort(),
    ['m.signing_key_update', 'org.matrix.signing_key_update'],
  );
  for (const edu of edus) assert.deepEqual(edu.content, { master_key, user_id: user });
  assert.throws(
    () => sender.sendDeviceListUpdate({ user_id: '@bob:b.test', device_id: 'D', stream_id: 1, destinations: ['b.test'] }),
    (e) => e.code === 'ERR_FEDSEND_INPUT' && /not a local user/.test(e.message),
  );
  assert.throws(
    () => sender.sendSigningKeyUpdate({ user_id: user, stream_id: 4, destinations: ['b.test'] }),
    (e) => e.code === 'ERR_FEDSEND_INPUT',
  );
  assert.deepEqual(errors, []);
  await sender.close();
});

test('a device-list update waits for its pokes to be durable while the storage write fails', async () => {
  const world = new World();
  const clock = new FakeClock();
  const store = new fedsend.MemoryStore();
  const flaky = failingTwice(store, 'device_list_pokes');
  const { sender, errors } = await startSender(world, clock, { options: { store: flaky } });
  let durable = false;
  const done = sender
    .sendDeviceListUpdate({ user_id: `@alice:${ORIGIN}`, device_id: 'D', stream_id: 1, keys: {}, destinations: ['b.test', 'c.test'] })
    .then(() => (durable = true));
  await settle();
  assert.equal(durable, false, 'not resolved while the write fails');
  assert.deepEqual(store.loadRecovered().device_list_pokes, []);
  await clock.advance(60_000);
  await done;
  assert.equal(flaky.failures, 2);
  assert.equal(errors.filter((e) => e.callback === 'store.applyChanges').length, 2);
  await sender.close();
});
