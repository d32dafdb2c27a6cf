// The browser build in a real browser: Debian's headless Chromium (playwright-core from
// tools/node) loads src/browser.js as a plain ES module from a local HTTP server, fetches
// the wasm through init(), and runs the raw machine, the driven sender and signing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CHROMIUM = '/usr/bin/chromium';
const TYPES = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };
const PAGE = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>fedsend</title>`;

function serve() {
  const server = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/') return res.writeHead(200, { 'content-type': 'text/html' }).end(PAGE);
    const file = normalize(join(ROOT, path));
    if (!file.startsWith(ROOT) || !existsSync(file)) return res.writeHead(404).end();
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' }).end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

test('src/browser.js in headless Chromium: init() fetches the wasm; machine, sender and signing work', { skip: !existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  const { chromium } = createRequire(new URL('../../tools/node/package.json', import.meta.url))('playwright-core');
  const server = await serve();
  const profile = mkdtempSync(join(tmpdir(), 'fedsend-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'],
  });
  try {
    const page = await context.newPage();
    const problems = [];
    page.on('pageerror', (e) => problems.push(e.message));
    page.on('console', (m) => m.type() === 'error' && problems.push(m.text()));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    const result = await page.evaluate(async () => {
      const f = await import('/src/browser.js');
      let before = '';
      try { new f.Machine({ server_name: 'a.test' }); } catch (e) { before = e.code; }
      await f.init();
      const m = new f.Machine({ server_name: 'a.test' });
      m.handleInput(1_700_000_000_000, { type: 'timeout' });
      const first = m.pollOutput();
      m.free();
      const sent = [];
      const key = f.SigningKey.fromSeedBytes('ed25519:b', crypto.getRandomValues(new Uint8Array(32)));
      const sender = await f.FederationSender.start({
        config: { server_name: 'a.test' },
        signingKey: key,
        transport: { sendTransaction: async (d, t, body, auth) => (sent.push({ d, body, auth }), { status: 200, body: '{}' }) },
        homeserver: { fetchEvents: () => [], loadCatchUp: () => [] },
      });
      await sender.sendEdu({ destination: 'b.test', edu_type: 'm.x', content: { n: 1 } });
      await new Promise((r) => setTimeout(r, 50));
      await sender.close();
      return { before, first, sent, canonical: f.canonicalJson({ z: 1, a: [true] }) };
    });
    assert.deepEqual(problems, []);
    assert.equal(result.before, 'ERR_FEDSEND_NOT_INITIALISED');
    assert.deepEqual(result.first, { type: 'persist', request: 1, changes: { incarnation: 1 } });
    assert.equal(result.sent.length, 1);
    assert.equal(result.sent[0].d, 'b.test');
    assert.deepEqual(JSON.parse(result.sent[0].body).edus, [{ content: { n: 1 }, edu_type: 'm.x' }]);
    assert.match(result.sent[0].auth, /^X-Matrix origin="a\.test",destination="b\.test",key="ed25519:b",sig="[A-Za-z0-9+/]{86}"$/);
    assert.equal(result.canonical, '{"a":[true],"z":1}');
  } finally {
    await context.close();
    server.close();
    rmSync(profile, { recursive: true, force: true });
  }
});
