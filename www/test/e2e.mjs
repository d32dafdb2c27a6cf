// Browser end-to-end test of the demo page: node www/test/e2e.mjs
//
// Serves www/ on 127.0.0.1 (a free port), opens it in Debian's headless Chromium through
// playwright-core (tools/node/node_modules; shared spec toolchain.md §3), waits for the page to
// run the built-in scenario through the wasm core, and checks the drawing: one card per remote
// server of www/scenarios/demo.json, some transactions sent, status `ok: …`. Any console
// error or page error fails the test. Saves a screenshot to artifacts/www-demo.png.
// Needs www/pkg (scripts/build-wasm.sh). Prints one result line; exit status 0 = pass.
//
// It lives in www/test/ but is not a `node --test` file: Node 20's runner runs every .mjs under
// a test/ directory, so when it does, this file only registers a skipped test.

import { createServer } from 'node:http';
import { createReadStream, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { extname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const WWW = resolve(fileURLToPath(new URL('..', import.meta.url)));
const ROOT = resolve(WWW, '..');
const SHOT = join(ROOT, 'artifacts', 'www-demo.png');
const CHROMIUM = '/usr/bin/chromium';
const TIMEOUT_MS = 30_000;

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
};

/** A static file server for `dir` on 127.0.0.1 and a free port. Resolves to { server, url }. */
function serve(dir) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    let file = resolve(dir, `.${path}`);
    if (file !== dir && !file.startsWith(dir + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      if (statSync(file).isDirectory()) file = join(file, 'index.html');
      statSync(file);
    } catch {
      res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: ${path}\n`);
      return;
    }
    res.writeHead(200, {
      'content-type': MIME[extname(file)] ?? 'application/octet-stream',
      'cache-control': 'no-store',
    });
    createReadStream(file).pipe(res);
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => ok({ server, url: `http://127.0.0.1:${server.address().port}/` }));
  });
}

/** Remote servers of the demo, counted independently of the page: servers of remote joiners. */
function demoRemoteServers() {
  const scenario = JSON.parse(readFileSync(join(WWW, 'scenarios', 'demo.json'), 'utf8'));
  const servers = new Set();
  for (const step of scenario.steps) {
    if (step.op !== 'join') continue;
    const server = step.user.slice(step.user.indexOf(':') + 1);
    if (server !== scenario.server_name) servers.add(server);
  }
  return servers;
}

async function main() {
  const problems = [];
  const { chromium } = createRequire(join(ROOT, 'tools', 'node', 'package.json'))('playwright-core');
  const expected = demoRemoteServers();
  const { server, url } = await serve(WWW);
  const profile = mkdtempSync(join(tmpdir(), 'fedsend-e2e-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      viewport: { width: 1280, height: 900 },
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run'],
    });
    const page = context.pages()[0] ?? (await context.newPage());
    page.on('console', (msg) => {
      if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
    });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('requestfailed', (req) => problems.push(`request failed: ${req.url()} (${req.failure()?.errorText})`));

    await page.goto(url);
    await page.waitForFunction(() => document.getElementById('status')?.textContent !== 'loading', null,
      { timeout: TIMEOUT_MS });
    const status = (await page.textContent('#status')) ?? '';
    const cards = await page.$$eval('#destinations .dest', (els) => els.map((el) => ({
      destination: el.dataset.destination, state: el.dataset.state, sent: Number(el.dataset.sent),
    })));
    mkdirSync(join(ROOT, 'artifacts'), { recursive: true });
    await page.screenshot({ path: SHOT, fullPage: true });

    if (!status.startsWith('ok')) problems.push(`status is ${JSON.stringify(status)}, not "ok: …"`);
    const drawn = cards.map((c) => c.destination).sort();
    const want = [...expected].sort();
    if (drawn.join() !== want.join()) {
      problems.push(`${cards.length} destination cards (${drawn.join(', ')}), want ${want.length} (${want.join(', ')})`);
    }
    if (!cards.some((c) => c.sent > 0)) problems.push('no destination has a transaction sent');
    if (cards.some((c) => !['idle', 'sending', 'failing'].includes(c.state))) {
      problems.push(`unknown card state in ${JSON.stringify(cards)}`);
    }
    // The replay slider: somewhere in the trace a transaction is in flight and a destination
    // is failing (cedar.example is unreachable for a while).
    const seen = await page.evaluate(() => {
      const slider = document.getElementById('position');
      const states = new Set();
      for (let i = 0; i <= Number(slider.max); i += 1) {
        slider.value = String(i);
        slider.dispatchEvent(new Event('input'));
        document.querySelectorAll('#destinations .dest').forEach((el) => states.add(el.dataset.state));
      }
      return [...states].sort();
    });
    for (const state of ['failing', 'sending']) {
      if (!seen.includes(state)) problems.push(`the replay never shows a ${state} destination (saw ${seen.join(', ')})`);
    }
    const summary = `${status}; ${cards.length} cards; ${cards.reduce((n, c) => n + c.sent, 0)} sends`;
    return { problems, summary };
  } finally {
    await context?.close();
    server.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

if (process.env.NODE_TEST_CONTEXT) {
  const { test } = await import('node:test');
  test('browser e2e', { skip: 'run it on its own: node www/test/e2e.mjs' }, () => {});
} else {
  try {
    const { problems, summary } = await main();
    if (problems.length) {
      console.log(`e2e FAIL: ${problems.join('; ')} (${summary}; screenshot ${relative(process.cwd(), SHOT)})`);
      process.exitCode = 1;
    } else {
      console.log(`e2e ok: ${summary}; screenshot ${relative(process.cwd(), SHOT)}`);
    }
  } catch (e) {
    console.log(`e2e FAIL: ${e instanceof Error ? e.message.split('\n')[0] : e}`);
    process.exitCode = 1;
  }
}
