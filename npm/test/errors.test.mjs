// Bad input of every kind: wrong config types, bad options, callbacks that throw, reject or
// return malformed data, calls after close(). Each gives a typed error with a clear message,
// and the sender keeps going where it can.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fedsend, FakeClock } from './helpers.mjs';
import { World, ORIGIN } from './world.mjs';

const { FederationSender, Machine, ConfigError, InputError, ClosedError, CallbackError } = fedsend;

function options(world, clock, extra = {}) {
  return {
    config: { server_name: ORIGIN },
    transport: world.transport,
    homeserver: world.homeserver,
    clock,
    onError: () => {},
    ...extra,
  };
}

test('wrong config types throw ConfigError naming the problem', () => {
  const world = new World();
  const cases = [
    [{ server_name: 42 }, /invalid config: invalid type: integer `42`, expected a string/],
    [{ server_name: ORIGIN, retry_interval_min_ms: 'soon' }, /invalid config: invalid type: string "soon", expected u64/],
    [{ server_name: ORIGIN, retry_intervall_min_ms: 1 }, /unknown field `retry_intervall_min_ms`/],
    [{ server_name: 'not a name' }, /invalid server name/],
    [{ server_name: ORIGIN, pdus_per_transaction_max: 51 }, /pdus_per_transaction_max.*between 1 and 50/],
    [{}, /missing field `server_name`/],
    [null, /config must be a plain object/],
    ['{"server_name":', /invalid config/],
  ];
  for (const [config, message] of cases) {
    assert.throws(
      () => new FederationSender({ ...options(world, new FakeClock()), config }),
      (e) => e instanceof ConfigError && e.code === 'ERR_FEDSEND_CONFIG' && message.test(e.message),
      `config ${JSON.stringify(config)}`,
    );
    assert.throws(() => new Machine(config), ConfigError);
  }
});

test('missing or wrong callbacks throw ConfigError naming the option', () => {
  const world = new World();
  const clock = new FakeClock();
  const cases = [
    [{ transport: undefined }, /options.transport.sendTransaction must be a function/],
    [{ transport: { sendTransaction: 'PUT' } }, /options.transport.sendTransaction must be a function/],
    [{ homeserver: { fetchEvents() {} } }, /options.homeserver.loadCatchUp must be a function/],
    [{ store: { loadRecovered() {} } }, /options.store.applyChanges must be a function/],
    [{ clock: { now: Date.now } }, /options.clock.setTimeout must be a function/],
    [{ onEvent: 'log' }, /options.onEvent must be a function/],
    [{ signingKey: 'ed25519:1 abc' }, /options.signingKey must be a SigningKey/],
  ];
  for (const [extra, message] of cases) {
    assert.throws(() => new FederationSender(options(world, clock, extra)), (e) => e instanceof ConfigError && message.test(e.message));
  }
  assert.throws(() => new FederationSender(), /options must be an object/);
});

test('refused commands throw InputError at once and change nothing', async () => {
  const world = new World();
  const clock = new FakeClock();
  const sender = await FederationSender.start(options(world, clock));
  assert.throws(() => sender.sendEdu({ destination: ORIGIN, edu_type: 'm.x', content: {} }), (e) => e instanceof InputError && /ourselves|refused/.test(e.message));
  assert.throws(() => sender.sendEdu({ destination: 'bad name!', edu_type: 'm.x', content: {} }), (e) => e instanceof InputError && /invalid server name/.test(e.message));
  assert.throws(() => sender.newEvents(-1), (e) => e instanceof InputError && /upTo must be a whole number/.test(e.message));
  assert.throws(() => sender.sendTyping({ room_id: '!r:a.test' }), (e) => e instanceof InputError && /missing field/.test(e.message));
  assert.throws(() => sender.handle({ type: 'frobnicate' }), (e) => e instanceof InputError && /unknown variant `frobnicate`/.test(e.message));
  assert.deepEqual(sender.destinationStats(), []);
  // Still working afterwards.
  await sender.sendEdu({ destination: 'b.test', edu_type: 'm.x', content: { a: 1 } });
  await clock.advance(10);
  assert.deepEqual(JSON.parse(world.sent[0].body).edus, [{ content: { a: 1 }, edu_type: 'm.x' }]);
  await sender.close();
});

test('every method after close() throws ClosedError; close is idempotent', async () => {
  const world = new World();
  const clock = new FakeClock();
  const sender = await FederationSender.start(options(world, clock));
  await sender.close();
  await sender.close();
  assert.equal(sender.closed, true);
  const calls = [
    () => sender.newEvents(1),
    () => sender.sendPdu(1),
    () => sender.sendEdu({ destination: 'b.test', edu_type: 'm.x', content: {} }),
    () => sender.sendReceipt({}),
    () => sender.sendTyping({}),
    () => sender.sendPresence({}),
    () => sender.sendToDevice({}),
    () => sender.sendDeviceListUpdate({}),
    () => sender.sendSigningKeyUpdate({}),
    () => sender.remoteUp('b.test'),
    () => sender.wakeDestination('b.test'),
    () => sender.setDestinationState({ destination: 'b.test' }),
    () => sender.handle({ type: 'timeout' }),
    () => sender.destinationStats(),
  ];
  for (const call of calls) assert.throws(call, (e) => e instanceof ClosedError && e.code === 'ERR_FEDSEND_CLOSED' && /closed/.test(e.message));
  assert.deepEqual(clock.pending, [], 'no timer left behind');
});

test('close() aborts a transaction in flight and waits for storage writes in flight', async () => {
  const world = new World();
  const clock = new FakeClock();
  let signal;
  world.script('b.test', ({ signal: s }) => ((signal = s), new Promise(() => {})));
  let release;
  const store = new fedsend.MemoryStore();
  const slow = {
    loadRecovered: () => store.loadRecovered(),
    catchUpRows: (q) => store.catchUpRows(q),
    loadOutstanding: (q) => store.loadOutstanding(q),
    applyChanges: (changes) =>
      changes.destination_rooms ? new Promise((resolve) => (release = () => resolve(store.applyChanges(changes)))) : store.applyChanges(changes),
  };
  const sender = await FederationSender.start(options(world, clock, { store: slow }));
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(10);
  assert.ok(signal && release);
  let closed = false;
  const closing = sender.close().then(() => (closed = true));
  await clock.advance(10);
  assert.equal(signal.aborted, true);
  assert.equal(closed, false, 'close waits for the write');
  release();
  await closing;
  assert.equal(store.catchUpRows({ destination: 'b.test', after: 0, up_to: 9, limit: 9 }).length, 1, 'the write landed');
});

test('callbacks that throw or reject are reported as CallbackError and retried', async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  let calls = 0;
  const fetchEvents = world.homeserver.fetchEvents;
  const homeserver = {
    ...world.homeserver,
    fetchEvents: (q) => {
      calls++;
      if (calls === 1) throw new Error('db connection lost');
      if (calls === 2) return Promise.reject(new Error('db still down'));
      return fetchEvents(q);
    },
  };
  const sender = await FederationSender.start(options(world, clock, { homeserver, onError: (e) => errors.push(e) }));
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(5 * 60_000);
  assert.ok(calls >= 3);
  const fetchErrors = errors.filter((e) => e instanceof CallbackError && e.callback === 'homeserver.fetchEvents');
  assert.deepEqual(fetchErrors.map((e) => e.message), ['homeserver.fetchEvents: db connection lost', 'homeserver.fetchEvents: db still down']);
  assert.equal(world.sentTo('b.test').length, 1, 'delivered once the callback works');
  await sender.close();
});

test('malformed callback data is refused, reported, and the request retried', async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  let calls = 0;
  const homeserver = {
    ...world.homeserver,
    fetchEvents: (q) => {
      calls++;
      if (calls === 1) return [{ event_id: 7 }];
      if (calls === 2) return { events: [] };
      return world.homeserver.fetchEvents(q);
    },
  };
  const sender = await FederationSender.start(options(world, clock, { homeserver, onError: (e) => errors.push(e) }));
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(5 * 60_000);
  assert.match(errors[0].message, /^homeserver.fetchEvents: returned data the sender refused: malformed input: invalid type: integer `7`/);
  assert.match(errors[1].message, /^homeserver.fetchEvents: must return an array/);
  assert.ok(errors.every((e) => e.code === 'ERR_FEDSEND_CALLBACK'));
  assert.equal(world.sentTo('b.test').length, 1);
  await sender.close();
});

test('a transport answer of the wrong shape is reported; the attempt counts as a timeout', async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  world.script('b.test', { status: '200' }, () => { throw new Error('socket hang up'); }, { status: 200, body: '{}' });
  const sender = await FederationSender.start(options(world, clock, { onError: (e) => errors.push(e) }));
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(5 * 60_000);
  assert.equal(world.sentTo('b.test').length, 3);
  assert.deepEqual(errors.map((e) => e.message), [
    'transport.sendTransaction: status must be an integer HTTP status (100-599), got "200"',
    'transport.sendTransaction: threw: socket hang up',
  ]);
  assert.equal(sender.destinationStats()[0].last_successful_stream_ordering, 1);
  await sender.close();
});

test('onEvent that throws is reported and does not stop the sender', async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  world.script('b.test', { status: 500 }, { status: 200 });
  const sender = await FederationSender.start(
    options(world, clock, {
      config: { server_name: ORIGIN, http_retries_max: 0 },
      onEvent: () => { throw new Error('logger broke'); },
      onError: (e) => errors.push(e),
    }),
  );
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(60 * 60_000);
  assert.ok(errors.some((e) => e.callback === 'onEvent' && /logger broke/.test(e.message)));
  assert.equal(sender.destinationStats()[0].last_successful_stream_ordering, 1);
  await sender.close();
});

test('a store that fails to load makes start() reject and the sender closed', async () => {
  const world = new World();
  const store = { ...new fedsend.MemoryStore(), loadRecovered: async () => { throw new Error('no such table'); }, applyChanges() {}, catchUpRows() { return []; }, loadOutstanding() { return []; } };
  await assert.rejects(
    FederationSender.start(options(world, new FakeClock(), { store })),
    (e) => e instanceof CallbackError && e.message === 'store.loadRecovered: no such table',
  );
  const sender = new FederationSender(options(world, new FakeClock(), { store }));
  await assert.rejects(sender.ready, CallbackError);
  assert.throws(() => sender.newEvents(1), (e) => e instanceof ClosedError && /start-up failed: store.loadRecovered: no such table/.test(e.message));
  const bad = { ...store, loadRecovered: () => ({ incarnation: 'one' }) };
  await assert.rejects(FederationSender.start(options(world, new FakeClock(), { store: bad })), (e) => e instanceof CallbackError && /invalid recovered state/.test(e.message));
});

test('commands issued before start-up finishes are applied after it, in order', async () => {
  const world = new World();
  const clock = new FakeClock();
  const sender = new FederationSender(options(world, clock));
  world.addEvent();
  const queued = sender.newEvents(1);
  await sender.ready;
  await queued;
  await clock.advance(10);
  assert.equal(world.sentTo('b.test').length, 1);
  await sender.close();
});

test('close() does not wait for a query that never answers; completions cannot be injected', async () => {
  const world = new World();
  const clock = new FakeClock();
  const homeserver = { ...world.homeserver, fetchEvents: () => new Promise(() => {}) };
  const sender = await FederationSender.start(options(world, clock, { homeserver }));
  assert.throws(() => sender.handle({ type: 'persisted', request: 1 }), (e) => e instanceof InputError && /completion/.test(e.message));
  await sender.newEvents(1);
  await clock.advance(10);
  await sender.close();
  assert.equal(sender.closed, true);
});
