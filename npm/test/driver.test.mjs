// What the wrapper over the Rust driver (host-wasm DrivenSender) adds: a bad clock reading is
// reported and never reaches the loop, a command refused from inside a callback throws there
// (the driver's machine is free while callbacks run), data the core refuses is blamed on the
// callback that returned it, and the default MemoryStore is written directly unless a method
// of it was replaced.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fedsend, FakeClock } from './helpers.mjs';
import { World, ORIGIN } from './world.mjs';

const { FederationSender, MemoryStore, CallbackError, InputError } = fedsend;

function options(world, clock, extra = {}) {
  return { config: { server_name: ORIGIN }, transport: world.transport, homeserver: world.homeserver, clock, ...extra };
}

test('a clock reading that is not whole ms is reported as clock.now and the last good one used', async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  let bad = false;
  const flaky = { ...clock, now: () => (bad ? 1.5 : clock.now()), setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout };
  const sender = await FederationSender.start(options(world, flaky, { onError: (e) => errors.push(e) }));
  world.addEvent();
  bad = true;
  await sender.newEvents(1);
  bad = false;
  await clock.advance(10);
  assert.ok(errors.length > 0 && errors.every((e) => e instanceof CallbackError && e.callback === 'clock.now'), errors.map(String).join('\n'));
  assert.match(errors[0].message, /^clock.now: must return whole Unix milliseconds, got 1.5/);
  assert.equal(world.sentTo('b.test').length, 1, 'still delivered');
  await sender.close();
});

test('a command refused from inside a callback throws InputError there, as outside; the sender goes on', async () => {
  const world = new World();
  const clock = new FakeClock();
  let sender;
  let refusal = null;
  sender = await FederationSender.start(
    options(world, clock, {
      config: { server_name: ORIGIN, http_retries_max: 0 },
      onEvent: (e) => {
        if (e.event !== 'backing_off' || refusal) return;
        try {
          sender.sendEdu({ destination: ORIGIN, edu_type: 'm.x', content: {} });
          refusal = 'accepted';
        } catch (error) {
          refusal = error;
        }
        sender.sendEdu({ destination: 'c.test', edu_type: 'm.from_callback', content: {} });
      },
    }),
  );
  world.script('b.test', { status: 500 });
  await sender.sendEdu({ destination: 'b.test', edu_type: 'm.x', content: {} });
  await clock.advance(100);
  assert.ok(refusal instanceof InputError, `got ${refusal}`);
  assert.deepEqual(world.sentTo('c.test').flatMap((t) => JSON.parse(t.body).edus).map((e) => e.edu_type), ['m.from_callback']);
  await sender.close();
});

test("well-formed callback data the core refuses is that callback's CallbackError, and the query is retried", async () => {
  const world = new World();
  const clock = new FakeClock();
  const errors = [];
  let calls = 0;
  const homeserver = {
    ...world.homeserver,
    // The first answer with an event goes backwards (not above `after`); the retry is right.
    fetchEvents: (request) => {
      const events = world.homeserver.fetchEvents(request);
      return events.length > 0 && ++calls === 1 ? [{ ...events[0], stream_ordering: 0 }] : events;
    },
  };
  const sender = await FederationSender.start(options(world, clock, { homeserver, onError: (e) => errors.push(e) }));
  world.addEvent();
  await sender.newEvents(1);
  await clock.advance(60_000);
  assert.equal(errors.length, 1, errors.map(String).join('\n'));
  assert.ok(errors[0] instanceof CallbackError, String(errors[0]));
  assert.equal(errors[0].callback, 'homeserver.fetchEvents');
  assert.match(errors[0].message, /returned data the sender refused: .*stream ordering 0/);
  assert.ok(calls >= 2, 'fetched again');
  assert.equal(world.sentTo('b.test').length, 1, 'still delivered');
  await sender.close();
});

test('the default MemoryStore holds what the sender wrote; a replaced applyChanges is still called', async () => {
  for (const replace of [false, true]) {
    const world = new World();
    const clock = new FakeClock();
    const store = new MemoryStore();
    let calls = 0;
    if (replace) {
      const original = store.applyChanges.bind(store);
      store.applyChanges = (changes) => (calls++, original(changes));
    }
    const sender = await FederationSender.start(options(world, clock, { store }));
    world.script('b.test', { error: 'unreachable' });
    world.addEvent();
    await sender.newEvents(1);
    await clock.advance(10);
    await sender.close();
    assert.deepEqual(store.catchUpRows({ destination: 'b.test', after: 0, up_to: 9, limit: 9 }), [{ room_id: '!room:a.test', stream_ordering: 1 }]);
    assert.equal(store.loadRecovered().incarnation, 1);
    assert.equal(calls > 0, replace, replace ? 'the replacement is called' : 'nothing replaced');
  }
});
