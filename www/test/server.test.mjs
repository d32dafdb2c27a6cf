// lib/server.mjs: the visualiser's static server (www/ plus the shipped scenarios).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { fileURLToPath } from 'node:url';
import { serve, shippedScenarios } from '../lib/server.mjs';

const WWW = fileURLToPath(new URL('..', import.meta.url));
const SCENARIOS = fileURLToPath(new URL('../../tests/scenarios/', import.meta.url));

/** GET `path` exactly as written (no client-side normalisation of `..`). */
function get(base, path) {
  return new Promise((ok, fail) => {
    const { hostname, port } = new URL(base);
    request({ hostname, port, path }, (res) => {
      let body = '';
      res.on('data', (c) => { body += c; });
      res.on('end', () => ok({ status: res.statusCode, type: res.headers['content-type'], body }));
    }).on('error', fail).end();
  });
}

test('serves www/, the shipped scenarios and their list, and nothing else', async () => {
  const { server, url } = await serve(WWW, { scenarios: SCENARIOS });
  try {
    const index = await get(url, '/');
    assert.equal(index.status, 200);
    assert.match(index.type, /text\/html/);
    const list = await get(url, '/scenarios/shipped/index.json');
    assert.deepEqual(JSON.parse(list.body), shippedScenarios(SCENARIOS));
    assert.ok(JSON.parse(list.body).includes('restart.json'));
    assert.ok(!JSON.parse(list.body).some((n) => n.endsWith('.jsonl')));
    const restart = await get(url, '/scenarios/shipped/restart.json');
    assert.equal(restart.status, 200);
    assert.equal(JSON.parse(restart.body).steps.length > 0, true);
    assert.equal((await get(url, '/scenarios/demo.json')).status, 200);
    assert.equal((await get(url, '/nope.html')).status, 404);
    for (const path of ['/../Cargo.toml', '/scenarios/shipped/../../Cargo.toml', '/%2e%2e/Cargo.toml',
      '/scenarios/shipped/..%2f..%2fCargo.toml']) {
      assert.ok([403, 404].includes((await get(url, path)).status), path);
    }
  } finally {
    server.close();
  }
});
