// Nothing acknowledged is lost on a crash: a process acknowledges to-device messages (their
// outbox rows durable in SQLite) and is killed with SIGKILL; a new process on the same file
// delivers them, exactly once, under a new incarnation.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fedsend, FakeClock, Database, tempDir } from './helpers.mjs';
import { World, ORIGIN } from './world.mjs';
import { SqliteStore } from '../src/sqlite.js';

const helpers = fileURLToPath(new URL('./helpers.mjs', import.meta.url));
const sqlite = fileURLToPath(new URL('../src/sqlite.js', import.meta.url));

const CHILD = `
const { fedsend, Database } = await import(${JSON.stringify(helpers)});
const { SqliteStore } = await import(${JSON.stringify(sqlite)});
const store = new SqliteStore(new Database(process.argv[1]));
const sender = await fedsend.FederationSender.start({
  config: { server_name: 'a.test' },
  transport: { sendTransaction: () => ({ error: 'unreachable' }) },
  homeserver: { fetchEvents: () => [], loadCatchUp: () => [] },
  store,
  onError: (e) => console.error(e.message),
});
for (let i = 1; i <= 3; i++) {
  await sender.sendToDevice({ sender: '@alice:a.test', message_type: 'm.t', message_id: 'm' + i, messages: { '@bob:b.test': { D: { n: i } } } });
  console.log('acked m' + i);
}
process.kill(process.pid, 'SIGKILL');
`;

test('to-device messages acknowledged before a SIGKILL are delivered after restart, once each', async (t) => {
  const file = join(tempDir(t), 'crash.sqlite');
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', CHILD, file], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(child.signal, 'SIGKILL', child.stderr);
  assert.equal(child.stdout, 'acked m1\nacked m2\nacked m3\n');

  const store = new SqliteStore(new Database(file));
  t.after(() => store.close());
  assert.equal(store.loadRecovered().to_device_outbox.length, 3);
  const world = new World();
  const clock = new FakeClock();
  const sender = await fedsend.FederationSender.start({
    config: { server_name: ORIGIN },
    transport: world.transport,
    homeserver: world.homeserver,
    store,
    clock,
  });
  await clock.advance(2 * 60_000);
  const edus = world.sentTo('b.test').flatMap((s) => JSON.parse(s.body).edus ?? []);
  assert.deepEqual(edus.map((e) => e.content.message_id), ['m1', 'm2', 'm3']);
  assert.ok(world.sentTo('b.test').every((s) => s.txnId.startsWith('2.')), 'a new incarnation');
  assert.deepEqual(store.loadRecovered().to_device_outbox, []);
  await sender.close();
});
