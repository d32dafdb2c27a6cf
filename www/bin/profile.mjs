#!/usr/bin/env node
// node www/bin/profile.mjs [URL-QUERY] [SECONDS]
//
// Where the visualiser's main thread spends its time: opens the page in headless Chromium
// (as www/test/e2e.mjs does; default query `seed=1&n=1000&rate=2&speed=100`), lets it run for
// 1.5 s, samples it with the DevTools protocol's CPU profiler for SECONDS (default 5), and
// prints the page's #perf figures, then the share of samples by function: inclusive for the
// page's own code (simulation = `advance`, folding = `sync`, drawing = `render`) and self
// time for the rest, wasm included. Shares, unlike times, move little with the machine's load,
// which is why BENCHMARKS.md quotes them beside the speeds.

import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serve } from '../lib/server.mjs';

const WWW = resolve(fileURLToPath(new URL('..', import.meta.url)));
const ROOT = resolve(WWW, '..');
const query = process.argv[2] ?? 'seed=1&n=1000&rate=2&speed=100';
const seconds = Number(process.argv[3] ?? 5);

const { chromium } = createRequire(join(ROOT, 'tools', 'node', 'package.json'))('playwright-core');
const { server, url } = await serve(WWW, { scenarios: join(ROOT, 'tests', 'scenarios') });
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  await page.goto(new URL(`?${query}`, url).href);
  await page.waitForTimeout(1500);
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Profiler.enable');
  await cdp.send('Profiler.setSamplingInterval', { interval: 200 });
  await cdp.send('Profiler.start');
  await page.waitForTimeout(seconds * 1000);
  const { profile } = await cdp.send('Profiler.stop');
  console.log(`#perf ${JSON.stringify(await page.$eval('#perf', (el) => ({ ...el.dataset })))}`);

  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map();
  for (const n of profile.nodes) for (const child of n.children ?? []) parent.set(child, n.id);
  const samples = new Map();
  for (const id of profile.samples) samples.set(id, (samples.get(id) ?? 0) + 1);
  // Rust symbols carry crate hashes and long generic paths; the head of the name is enough.
  const name = (n) => (n.callFrame.functionName || '(anonymous)').replace(/\[[0-9a-f]{16}\]/g, '').slice(0, 110);
  const own = (n) => /\.mjs$/.test(n.callFrame.url);
  const self = new Map();
  const inclusive = new Map();
  let total = 0;
  for (const [id, count] of samples) {
    total += count;
    const leaf = nodes.get(id);
    self.set(name(leaf), (self.get(name(leaf)) ?? 0) + count);
    const seen = new Set();
    for (let at = id; at !== undefined; at = parent.get(at)) {
      const n = nodes.get(at);
      const key = `${name(n)} (${n.callFrame.url.split('/').pop()})`;
      if (!own(n) || seen.has(key)) continue;
      seen.add(key);
      inclusive.set(key, (inclusive.get(key) ?? 0) + count);
    }
  }
  const pct = (c) => `${((100 * c) / total).toFixed(1).padStart(5)}%`;
  console.log(`${total} samples; the page's functions, inclusive:`);
  for (const [k, c] of [...inclusive].sort((a, b) => b[1] - a[1]).slice(0, 20)) console.log(`${pct(c)} ${k}`);
  console.log('self time:');
  for (const [k, c] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`${pct(c)} ${k}`);
} finally {
  await browser.close();
  server.close();
}
