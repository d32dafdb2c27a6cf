// The example program: real HTTPS to a loopback remote, signed requests, a retry after 503.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

test('examples/send.mjs delivers a PDU and a to-device message over HTTPS', () => {
  const script = fileURLToPath(new URL('../examples/send.mjs', import.meta.url));
  const r = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 0, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
  assert.match(r.stdout, /to-device message durable in the outbox/);
  assert.match(r.stdout, /delivered to 127\.0\.0\.1:\d+ over HTTPS: \d+ PDU, \d+ EDU, \d+ signed requests \(the first answered 503\)/);
  assert.equal(r.stderr, '');
});
