// Browser end-to-end tests of the visualiser: node www/test/e2e.mjs [CHECK…]
//
// Serves www/ (and tests/scenarios/ as the shipped scenarios) on 127.0.0.1, a free port, with
// lib/server.mjs, and drives the page in Debian's headless Chromium through playwright-core
// (tools/node/node_modules; docs/toolchain.md, 'Browser tests'). Every check asserts from the DOM
// (text and data-* attributes). Any console error, page error or failed request fails the
// run. Screenshots of the main states go to artifacts/www-*.png. Prints one line per check
// and a result line; exit status 0 = pass. Needs www/pkg (scripts/build-wasm.sh).
//
// Checks (all by default, or the named ones): live, mix, backoff, restart, faults, determinism,
// worker, traces, driven, replay, demo, perf. `worker`: the world in a Web Worker (the default) and on
// the page's thread (`worker=0`) give the same run. `perf` prints the frame time with 1 000 destinations at 100×, and
// how fast the same world runs with nothing drawn (figures: BENCHMARKS.md).
// `traces` is the exception to asserting from the DOM: it runs every shipped scenario through
// runScenario in the page (test/traces.html) and compares the whole trace texts, byte for byte,
// with the committed .trace.jsonl files that native, wasmtime and Node are held to. `driven`
// runs the npm package's driven FederationSender (fedsend-driver's loop, compiled to wasm) in
// the page with real timers against a fake transport, and checks what it delivered.
//
// It lives in www/test/ but is not a `node --test` file: Node 20's runner runs every .mjs under
// a test/ directory, so when it does, this file only registers a skipped test.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MIXES, TICK_MS, backoffBoundMs, fnv, traceCounts } from '../lib/live.mjs';
import { serve } from '../lib/server.mjs';

const WWW = resolve(fileURLToPath(new URL('..', import.meta.url)));
const ROOT = resolve(WWW, '..');
const SCENARIOS = join(ROOT, 'tests', 'scenarios');
const NPM = join(ROOT, 'npm');
const ARTIFACTS = join(ROOT, 'artifacts');
const CHROMIUM = '/usr/bin/chromium';
const TIMEOUT_MS = 30_000;

let base; // the server's address

class Failure extends Error {}
function expect(ok, message) {
  if (!ok) throw new Failure(message);
}

async function summary(page) {
  return page.$eval('#summary', (el) => Object.fromEntries(Object.entries(el.dataset)
    .map(([k, v]) => [k, k === 'digest' || Number.isNaN(Number(v)) ? v : Number(v)])));
}

async function detail(page) {
  return page.$eval('#detail', (el) => ({ ...el.dataset }));
}

async function ready(page, path, want = 'ok') {
  await page.goto(new URL(path, base).href);
  await page.waitForFunction(() => document.getElementById('status')?.textContent !== 'loading', null, { timeout: TIMEOUT_MS });
  const status = await page.textContent('#status');
  expect(status.startsWith(want), `status is ${JSON.stringify(status)}`);
}

async function shot(page, name) {
  const path = join(ARTIFACTS, `www-${name}.png`);
  await page.screenshot({ path, fullPage: true });
  return relative(process.cwd(), path);
}

/** Clicks "step 1 s" and waits until the page shows its second (with the world in a Web
 * Worker, the default, it arrives a moment after the click). */
async function step(page) {
  const t0 = (await summary(page)).now;
  await page.click('#step');
  await page.waitForFunction((t) => Number(document.getElementById('summary').dataset.now) >= t, t0 + 1000,
    { timeout: TIMEOUT_MS, polling: 20 });
}

/** Clicks "step 1 s" until `until(detail)` or `max` steps; returns the virtual ms stepped. */
async function stepUntil(page, until, max) {
  const t0 = (await summary(page)).now;
  for (let i = 0; i < max; i += 1) {
    if (until(await detail(page))) break;
    await step(page);
  }
  return (await summary(page)).now - t0;
}

/** Sets the workload's event rate and every EDU mix to 0 (so that the world can settle). */
async function quiet(page) {
  for (const input of ['#rate', ...Object.keys(MIXES).map((mix) => `#${mix}`)]) {
    await page.fill(input, '0');
    await page.dispatchEvent(input, 'change');
  }
}

async function waitVirtual(page, ms) {
  const t0 = (await summary(page)).now;
  await page.waitForFunction((target) => Number(document.getElementById('summary').dataset.now) >= target, t0 + ms,
    { timeout: TIMEOUT_MS, polling: 100 });
}

const CHECKS = {
  async live(page) {
    await ready(page, '?seed=1&n=30');
    await page.waitForFunction(() => Number(document.getElementById('summary').dataset.delivered) > 0, null,
      { timeout: TIMEOUT_MS });
    const a = await summary(page);
    await page.waitForTimeout(1500);
    const b = await summary(page);
    expect(b.now > a.now, `virtual time did not move (${a.now} → ${b.now})`);
    expect(b.sends > a.sends && b.delivered > a.delivered, `numbers did not move: ${JSON.stringify([a, b])}`);
    expect(b.edus > 0, `no EDU delivered by t=+${b.now} ms`);
    expect(b.total === 30, `${b.total} destinations drawn, want 30`);
    await page.click('#world', { position: { x: 200, y: 40 } });
    const d = await detail(page);
    expect(d.dest, 'clicking the world selected no destination');
    const file = await shot(page, 'live');
    return `t=+${b.now} ms, ${b.sends} sends, ${b.delivered} PDUs and ${b.edus} EDUs delivered, clicked ${d.dest}; ${file}`;
  },

  async mix(page) {
    // Every EDU mix on, from the URL: each kind reaches the destinations and is listed in the
    // summary and in a destination's "received".
    const want = ['m.typing', 'm.presence', 'm.direct_to_device', 'm.device_list_update'];
    await ready(page, '?seed=4&n=12&rooms=2&rate=1&edus=2&presence=2&todevice=3&devices=2&speed=0&select=s0001.example');
    await stepUntil(page, () => false, 20);
    const kinds = JSON.parse(await page.$eval('#edu-kinds', (el) => el.dataset.kinds));
    for (const kind of want) expect(kinds[kind] > 0, `no ${kind} delivered with every mix on: ${JSON.stringify(kinds)}`);
    const received = await page.$eval('#d-received', (el) => ({ text: el.textContent, kinds: JSON.parse(el.dataset.kinds) }));
    expect(received.kinds['m.presence'] > 0 && received.text.includes('m.presence'),
      `s0001.example's detail lists no presence received: ${JSON.stringify(received)}`);
    for (const mix of Object.keys(MIXES)) {
      expect(await page.inputValue(`#${mix}`) !== '0', `the ${mix} control does not show the URL's rate`);
    }
    const file = await shot(page, 'mix');
    // Off again: after the queues drain, those kinds stop growing.
    await quiet(page);
    await stepUntil(page, () => false, 15);
    const before = JSON.parse(await page.$eval('#edu-kinds', (el) => el.dataset.kinds));
    await stepUntil(page, () => false, 20);
    const after = JSON.parse(await page.$eval('#edu-kinds', (el) => el.dataset.kinds));
    for (const kind of want) expect(after[kind] === before[kind], `${kind} still delivered with its mix at 0: ${before[kind]} → ${after[kind]}`);
    const log = new URL(page.url()).searchParams.get('log') ?? '';
    expect(['presence', 'todevice', 'devices', 'edus'].every((mix) => log.includes(`:${mix}:0`)), `mix changes missing from the URL's log: ${log}`);
    return `delivered ${JSON.stringify(kinds)}; s0001.example received ${received.text.split(' · ')[0]}; all mixes at 0 → no more; ${file}`;
  },

  async backoff(page) {
    const host = 's0003.example';
    await ready(page, `?seed=1&n=30&speed=0&select=${host}`);
    await stepUntil(page, () => false, 5);
    await page.click('[data-action=down]');
    const bound = backoffBoundMs() + 1000;
    const took = await stepUntil(page, (d) => d.state === 'backing_off', Math.ceil(bound / 1000) + 5);
    let d = await detail(page);
    expect(d.state === 'backing_off', `${host} is ${d.state} ${took} ms after going down, want backing_off within ${bound} ms`);
    expect(took <= bound, `${host} took ${took} ms to back off, bound ${bound} ms`);
    const downShot = await shot(page, 'backing-off');
    // Down long enough for its queue to be dropped (catch_up_threshold_ms), then up + contact.
    await page.click('#speed100');
    await waitVirtual(page, 200_000);
    await page.click('#pause');
    d = await detail(page);
    expect(d.converged === 'false', `${host} converged while down`);
    await page.click('[data-action=up]');
    await page.click('[data-action=inbound]');
    await quiet(page);
    await page.click('#speed10');
    const seen = new Set();
    const deadline = Date.now() + TIMEOUT_MS;
    for (;;) {
      d = await detail(page);
      seen.add(d.state);
      if (d.converged === 'true' && d.state === 'idle') break;
      expect(Date.now() < deadline, `${host} did not converge after coming back (${JSON.stringify(d)})`);
      await page.waitForTimeout(30);
    }
    await page.click('#pause');
    const upShot = await shot(page, 'caught-up');
    return `backing off ${took} ms after going down (bound ${bound}); after up + inbound: states ${[...seen].join(' → ')}, converged; ${downShot}, ${upShot}`;
  },

  async restart(page) {
    await ready(page, '?seed=3&n=40&speed=10');
    await waitVirtual(page, 10_000);
    await page.click('#restart');
    await waitVirtual(page, 3_000);
    const mid = await shot(page, 'restart');
    await quiet(page);
    await page.click('#speed100');
    await page.waitForFunction(() => {
      const s = document.getElementById('summary').dataset;
      return s.converged === s.total && s.queued === '0' && s.inflight === '0';
    }, null, { timeout: TIMEOUT_MS, polling: 100 });
    const s = await summary(page);
    return `after a restart every destination converged (${s.converged}/${s.total}, ${s.delivered} PDUs); ${mid}`;
  },

  async faults(page) {
    await ready(page, '?seed=2&n=30&rate=4&speed=0');
    const pick = async (host) => {
      await page.fill('#pick', host);
      await page.dispatchEvent('#pick', 'change');
      expect((await detail(page)).dest === host, `could not select ${host}`);
    };
    await stepUntil(page, () => false, 2);
    await pick('s0005.example');
    await page.click('[data-action=flaky]');
    await pick('s0006.example');
    await page.click('[data-action=ratelimit]');
    await pick('s0007.example');
    await page.click('[data-action=poison]');
    await page.click('#partition');
    await stepUntil(page, () => false, 30);
    const poisoned = await detail(page);
    expect(Number(poisoned.dropped) >= 1, `the poisoned event was not dropped for s0007 (${JSON.stringify(poisoned)})`);
    await pick('s0006.example');
    const limited = await detail(page);
    expect(Number(limited.failed) >= 1 && limited.state !== 'idle', `s0006 rate-limited but ${JSON.stringify(limited)}`);
    const s = await summary(page);
    const failing = s.stateRetrying + s.stateBackingOff + s.stateGone;
    expect(failing >= 12, `only ${failing} destinations failing with half of them partitioned (${JSON.stringify(s)})`);
    const file = await shot(page, 'faults');
    await page.click('#partition'); // heal
    await page.fill('#rate', '0');
    await page.dispatchEvent('#rate', 'change');
    await page.click('#speed100');
    await waitVirtual(page, 180_000);
    const healed = await summary(page);
    expect(healed.stateBackingOff + healed.stateGone <= 2, `after healing: ${JSON.stringify(healed)}`);
    return `poison dropped for s0007, s0006 ${limited.state} after ${limited.failed} 429s, ${failing} failing in the partition; healed: ${healed.converged}/${healed.total} converged; ${file}`;
  },

  async determinism(page) {
    const runOnce = async (seed) => {
      await ready(page, `?seed=${seed}&n=20&rate=5&speed=0&select=s0002.example`);
      await stepUntil(page, () => false, 4);
      await page.click('[data-action=down]');
      await page.click('#restart');
      await stepUntil(page, () => false, 6);
      await page.click('[data-action=up]');
      await stepUntil(page, () => false, 4);
      return (await summary(page)).digest;
    };
    const a = await runOnce(11);
    const recorded = page.url();
    const b = await runOnce(11);
    const c = await runOnce(12);
    expect(a === b, `seed 11 twice gave digests ${a} and ${b}`);
    expect(a !== c, `seeds 11 and 12 gave the same digest ${a}`);
    // The URL of the first run replays it: its actions are in `log`, with their ticks.
    expect(new URL(recorded).searchParams.get('log')?.includes(':down:s0002.example'), `no action log in ${recorded}`);
    await ready(page, recorded);
    await stepUntil(page, () => false, 14);
    const d = (await summary(page)).digest;
    expect(d === a, `the recorded URL replayed to digest ${d}, want ${a} (${recorded})`);
    return `seed 11 twice: ${a} = ${b}; seed 12: ${c}; replayed from the URL's action log: ${d}`;
  },

  async worker(page) {
    // The world runs in a Web Worker unless `worker=0`: stepped with the same seed and the
    // same action, both must show the same run (digest, sends); then, let run in the worker,
    // virtual time moves and transactions are delivered.
    const stepped = async (worker) => {
      await ready(page, `?seed=5&n=20&rate=5&speed=0&select=s0002.example${worker ? '' : '&worker=0'}`);
      for (let i = 1; i <= 6; i += 1) {
        if (i === 3) await page.click('[data-action=down]');
        await step(page);
      }
      return summary(page);
    };
    const here = await stepped(false);
    const there = await stepped(true);
    expect(here.digest === there.digest && here.sends === there.sends,
      `stepped with the world in a worker: digest ${there.digest}, ${there.sends} sends; on the page: ${here.digest}, ${here.sends}`);
    expect(new URL(page.url()).searchParams.get('log')?.includes(':down:s0002.example'), `no action log in ${page.url()}`);
    await ready(page, '?seed=1&n=30&speed=10');
    await page.waitForFunction(() => {
      const s = document.getElementById('summary').dataset;
      return Number(s.now) >= 5000 && Number(s.delivered) > 0;
    }, null, { timeout: TIMEOUT_MS, polling: 100 });
    const s = await summary(page);
    return `stepped 6 s with a down: digest ${there.digest} = ${here.digest}, ${there.sends} sends; running at 10×: t=+${s.now} ms, ${s.delivered} PDUs delivered`;
  },

  async traces(page) {
    const onDisk = readdirSync(SCENARIOS).filter((f) => f.endsWith('.json')).sort();
    await page.goto(new URL('test/traces.html', base).href);
    const t0 = Date.now();
    // In the page: the web build (core and simulated world both in wasm), driven exactly as the
    // Node runner drives it, over every scenario the server lists as shipped.
    const runs = await page.evaluate(async () => {
      const wasm = await import(new URL('../pkg/fedsend_wasm.js', location.href).href);
      const { senderEngine } = await import(new URL('../lib/engine.mjs', location.href).href);
      await wasm.default();
      const shipped = new URL('../scenarios/shipped/', location.href);
      const names = await (await fetch(new URL('index.json', shipped))).json();
      // Strict UTF-8 with the BOM kept, as the other runners read a scenario file.
      const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
      const out = [];
      for (const name of names) {
        const res = await fetch(new URL(encodeURIComponent(name), shipped));
        if (!res.ok) {
          out.push({ name, error: `GET ${res.url}: HTTP ${res.status}` });
          continue;
        }
        const lines = [];
        const engine = senderEngine(wasm.FederationSender);
        try {
          wasm.runScenario(utf8.decode(await res.arrayBuffer()), engine, (line) => lines.push(line, '\n'));
          out.push({ name, trace: lines.join('') });
        } catch (e) {
          out.push({ name, error: String(e?.message ?? e), trace: lines.join('') });
        } finally {
          engine.free();
        }
      }
      return out;
    });
    const ms = Date.now() - t0;
    const ran = runs.map((r) => r.name);
    expect(JSON.stringify(ran) === JSON.stringify(onDisk),
      `the page ran ${ran.length} scenarios, tests/scenarios/ has ${onDisk.length}: ${diffNames(ran, onDisk)}`);
    expect(onDisk.length >= 10, `only ${onDisk.length} scenarios in tests/scenarios/`);
    const wrong = [];
    let bytes = 0;
    for (const { name, trace = '', error } of runs) {
      const golden = name.replace(/\.json$/, '.trace.jsonl');
      if (!existsSync(join(SCENARIOS, golden))) {
        wrong.push(`${name}: no committed ${golden}`);
        continue;
      }
      const want = readFileSync(join(SCENARIOS, golden));
      const got = Buffer.from(trace, 'utf8');
      bytes += got.length;
      if (error !== undefined) wrong.push(`${name}: failed in the page: ${error}`);
      else if (!got.equals(want)) wrong.push(`${name}: ${firstDifference(trace, want.toString('utf8'))}`);
    }
    expect(wrong.length === 0, `${wrong.length} of ${runs.length} traces differ from the committed ones: ${wrong.join('; ')}`);
    return `${runs.length} of ${onDisk.length} shipped scenarios run in the page (${ms} ms): every trace byte-identical to its .trace.jsonl (${bytes} B)`;
  },

  async driven(page) {
    await page.goto(new URL('test/driven.html', base).href);
    const EVENTS = 120;
    const REMOTES = ['a.test', 'b.test', 'c.test'];
    // In the page: the package's browser entry, as a bundler would load it; the sender runs on
    // the page's own timers (no injected clock). b.test answers its first attempt with a 500,
    // so the retry is a real timer firing; every answer comes on a later turn of the loop.
    const run = await page.evaluate(async ({ EVENTS, REMOTES }) => {
      const fedsend = await import(new URL('/npm/src/browser.js', location.href).href);
      await fedsend.init();
      const origin = 'origin.test';
      const events = [];
      for (let i = 1; i <= EVENTS; i += 1) {
        const pdu = { event_id: `$${i}`, room_id: `!r:${origin}`, sender: `@alice:${origin}`, type: 'm.room.message', content: { i } };
        events.push({ event_id: pdu.event_id, room_id: pdu.room_id, stream_ordering: i, sender: pdu.sender, hosts: [origin, ...REMOTES], pdu });
      }
      const attempts = [];
      const failing = new Set(['b.test']);
      const t0 = performance.now();
      const sender = await fedsend.FederationSender.start({
        config: { server_name: origin, retry_interval_min_ms: 200, retry_interval_max_ms: 1000, http_retry_delay_max_ms: 100 },
        transport: {
          async sendTransaction(destination, txnId, body) {
            await new Promise((resolve) => setTimeout(resolve, 1));
            const parsed = JSON.parse(body);
            const status = failing.delete(destination) ? 500 : 200;
            attempts.push({ destination, txnId, status, pdus: (parsed.pdus ?? []).map((p) => p.event_id), edus: (parsed.edus ?? []).map((e) => e.edu_type) });
            return { status, body: status === 200 ? { pdus: {} } : { errcode: 'M_UNKNOWN' } };
          },
        },
        homeserver: {
          fetchEvents: ({ after, limit }) => events.filter((e) => e.stream_ordering > after).slice(0, limit),
          loadCatchUp: ({ rows }) => rows.map((r) => {
            const e = events.find((x) => x.stream_ordering === r.stream_ordering);
            return { ...r, event_id: e.event_id, pdu: e.pdu };
          }),
        },
        store: new fedsend.MemoryStore(),
      });
      await sender.newEvents(EVENTS);
      // Resolves once the outbox row is durable in the store.
      await sender.sendToDevice({ sender: `@alice:${origin}`, message_type: 'm.test', message_id: 'm1', messages: { '@bob:c.test': { DEVICE: { hello: 1 } } } });
      const done = () => REMOTES.every((r) => attempts.filter((a) => a.destination === r && a.status === 200).flatMap((a) => a.pdus).length >= EVENTS)
        && attempts.some((a) => a.destination === 'c.test' && a.status === 200 && a.edus.includes('m.direct_to_device'));
      while (!done() && performance.now() - t0 < 20_000) await new Promise((resolve) => setTimeout(resolve, 20));
      const stats = sender.destinationStats().map((s) => ({ destination: s.destination, state: s.state }));
      await sender.close();
      return { attempts, stats, closed: sender.closed, ms: Math.round(performance.now() - t0) };
    }, { EVENTS, REMOTES });
    const want = Array.from({ length: EVENTS }, (_, i) => `$${i + 1}`);
    for (const remote of REMOTES) {
      const got = run.attempts.filter((a) => a.destination === remote && a.status === 200).flatMap((a) => a.pdus);
      expect(JSON.stringify(got) === JSON.stringify(want),
        `${remote} received ${got.length} PDUs, want ${EVENTS} once each in order: ${got.slice(0, 8).join(',')}…`);
    }
    const failedFirst = run.attempts.find((a) => a.destination === 'b.test');
    expect(failedFirst?.status === 500, `b.test's first attempt was ${JSON.stringify(failedFirst)}, want the scripted 500`);
    const retried = run.attempts.filter((a) => a.destination === 'b.test' && a.txnId === failedFirst.txnId);
    expect(retried.length >= 2 && retried.at(-1).status === 200, `the 500 was not retried to success: ${JSON.stringify(retried)}`);
    const toDevice = run.attempts.filter((a) => a.status === 200 && a.edus.includes('m.direct_to_device'));
    expect(toDevice.length === 1 && toDevice[0].destination === 'c.test', `to-device deliveries: ${JSON.stringify(toDevice)}`);
    expect(run.stats.length === REMOTES.length && run.stats.every((s) => s.state === 'idle'), `stats after draining: ${JSON.stringify(run.stats)}`);
    expect(run.closed, 'close() resolved but the sender does not say it is closed');
    const transactions = run.attempts.filter((a) => a.status === 200).length;
    return `${EVENTS} events to ${REMOTES.length} remotes and a to-device message over real timers in ${run.ms} ms: `
      + `${transactions} transactions, b.test's 500 retried to success (txn ${failedFirst.txnId}), every destination idle, closed`;
  },

  async replay(page) {
    const results = [];
    for (const name of ['restart.json', 'long-outage-catch-up.json', 'd7-poison-transaction.json']) {
      await ready(page, `?scenario=${name}`);
      const steps = Number(await page.$eval('#r-pos', (el) => el.dataset.count));
      for (let i = 0; i <= steps; i += 1) await page.click('#r-step');
      const pos = await page.$eval('#r-pos', (el) => ({ ...el.dataset }));
      expect(pos.done === 'true', `${name}: not at the end after ${steps + 1} steps (${JSON.stringify(pos)})`);
      const shown = await page.$eval('#r-counts', (el) => Object.fromEntries(Object.entries(el.dataset).map(([k, v]) => [k, Number(v)])));
      const nativeText = nativeTrace(name);
      const want = traceCounts(nativeText.split('\n'));
      expect(JSON.stringify(shown) === JSON.stringify(want),
        `${name}: the page shows ${JSON.stringify(shown)}, the native trace has ${JSON.stringify(want)}`);
      // Stronger: the page's digest of its whole trace equals that of the native trace text.
      const digest = fnv(0x811c9dc5, nativeText).toString(16).padStart(8, '0');
      const shownDigest = (await summary(page)).digest;
      expect(shownDigest === digest, `${name}: trace digest ${shownDigest} in the page, ${digest} natively`);
      results.push(`${name} ${want.lines} lines/${want.send} sends, digest ${digest}`);
      if (name === 'long-outage-catch-up.json') results.push(await shot(page, 'replay'));
    }
    // A file picked from disk (the drop target reads files the same way).
    await page.setInputFiles('#scenario-file', join(SCENARIOS, 'basic-fanout.json'));
    await page.waitForFunction(() => document.getElementById('status').textContent.includes('basic-fanout.json'));
    await page.click('#r-end');
    const shown = await page.$eval('#r-counts', (el) => Number(el.dataset.lines));
    expect(shown === traceCounts(nativeTrace('basic-fanout.json').split('\n')).lines, 'basic-fanout.json from a file: wrong count');
    const source = nativeSource();
    return `counts equal the native engine's (${source ? relative(ROOT, source) : 'expected .trace.jsonl'}): ${results.join(', ')}, basic-fanout.json (file)`;
  },

  async demo(page) {
    await ready(page, '?scenario=demo.json&select=cedar.example');
    const seen = new Set();
    let midShot = null;
    for (;;) {
      const more = await page.$eval('#r-pos', (el) => el.dataset.done !== 'true');
      const { state } = await detail(page);
      seen.add(state);
      if (state === 'backing_off' && !midShot) midShot = await shot(page, 'demo-backing-off');
      if (!more) break;
      await page.click('#r-step');
    }
    for (const state of ['backing_off', 'idle']) expect(seen.has(state), `cedar.example never ${state} in the demo (saw ${[...seen]})`);
    const file = await shot(page, 'demo');
    return `cedar.example went through ${[...seen].join(', ')}; ${midShot}, ${file}`;
  },

  async perf(page) {
    // The default workload (2 events/s, rooms of ~330 servers: ~650 transactions/s against the
    // global cap of 128 in flight), then a light one (0.2 events/s); both with the default EDU
    // mix, whose device-list changes go to all 1 000 servers.
    // Both with the world in a Web Worker (the default), where the frame time is the folding
    // and drawing left to the page's thread, then on the page's thread (`worker=0`), where the
    // simulation shares the frames.
    const lines = [];
    let file;
    for (const [rate, worker] of [[2, true], [0.2, true], [2, false], [0.2, false]]) {
      await ready(page, `?seed=1&n=1000&rate=${rate}&speed=100${worker ? '' : '&worker=0'}`);
      await page.waitForTimeout(6000);
      const perf = await page.$eval('#perf', (el) => ({ ...el.dataset }));
      const s = await summary(page);
      expect(Number(perf.frames) > 10, `only ${perf.frames} frames in 6 s`);
      file ??= await shot(page, '1000');
      const where = worker ? ', world in a worker' : ', world on the page\'s thread';
      const line = `1000 destinations at 100×, ${rate} events/s${where}: frame time mean ${perf.frameMean} ms, p95 ${perf.frameP95} ms, max ${perf.frameMax} ms over ${perf.frames} frames (simulation ${perf.simMean}, folding ${perf.foldMean}, drawing ${perf.drawMean} ms per frame); virtual time ran at ${perf.effectiveSpeed}× (t=+${s.now} ms, ${s.sends} sends)`;
      console.log(`perf: ${line}`);
      lines.push(line);
    }
    // What bounds the figures above: the same world (2 events/s) run in a blank page as fast as
    // it goes, with nothing drawn; `folded` also folds the trace and the core's figures into
    // the page's model once per 33 ms, as the page does while it simulates.
    await page.goto(new URL('test/traces.html', base).href);
    for (const folded of [false, true]) {
      const r = await page.evaluate(async (folded) => {
        const wasm = await import(new URL('../pkg/fedsend_wasm.js', location.href).href);
        const { LiveRun } = await import(new URL('../lib/live.mjs', location.href).href);
        await wasm.default();
        const run = new LiveRun(wasm.LiveSimulation, { seed: 1, destinations: 1000, rooms: 4, rate: 2 });
        const v0 = run.now;
        const t0 = performance.now();
        let synced = t0;
        let ticks = 0;
        let sends = 0;
        for (let now = t0; now - t0 < 4000; now = performance.now()) {
          run.advance(1);
          ticks += 1;
          if (!folded) sends += run.sim.takeTrace().split('"kind":"send"').length - 1;
          else if (now - synced >= 33) {
            run.sync();
            synced = now;
          }
        }
        run.sync();
        const ms = performance.now() - t0;
        const out = { ticks, virt: run.now - v0, ms, sends: folded ? run.model.counts.send : sends };
        run.free();
        return out;
      }, folded);
      expect(r.ticks > 0 && r.virt === r.ticks * TICK_MS && r.sends > 0, `the world alone: ${JSON.stringify(r)}`);
      const line = `the world and core alone${folded ? ' + folding' : ''}, nothing drawn (2 events/s): ${(r.virt / r.ms).toFixed(2)}× (${(r.ms / (r.virt / 1000)).toFixed(1)} ms per virtual second, ${r.sends} sends in ${r.ticks} ticks)`;
      console.log(`perf: ${line}`);
      lines.push(line);
    }
    return `${lines.join('; ')}; ${file}`;
  },
};

/** What is in one list of scenario names and not the other. */
function diffNames(got, want) {
  const missing = want.filter((n) => !got.includes(n));
  const extra = got.filter((n) => !want.includes(n));
  return `not run: ${missing.join(', ') || '–'}; not on disk: ${extra.join(', ') || '–'}`;
}

/** The first line where two trace texts differ, both versions, cut around the first differing
 * character (a to-device line can be 64 KiB long). */
function firstDifference(got, want) {
  const a = got.split('\n');
  const b = want.split('\n');
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i += 1;
  let col = 0;
  while (col < (a[i]?.length ?? 0) && a[i][col] === b[i]?.[col]) col += 1;
  const cut = (line) => {
    if (line === undefined) return '(no such line)';
    if (line === '') return '(empty line)';
    const from = Math.max(0, col - 80);
    return `${from ? '…' : ''}${line.slice(from, col + 120)}${col + 120 < line.length ? '…' : ''}`;
  };
  return `line ${i + 1} (column ${col + 1}) differs; page: ${cut(a[i])} | committed: ${cut(b[i])}`;
}

/** Where `nativeTrace` takes the native engine's traces from. */
function nativeSource() {
  if (process.env.FEDSEND_BIN) return process.env.FEDSEND_BIN;
  // target/release/fedsend only when it is at least as new as the wasm build the page runs
  // (else it may be a different core); otherwise the expected traces, which `cargo test`
  // checks the native engine against.
  const bin = join(ROOT, 'target', 'release', 'fedsend');
  const wasm = join(WWW, 'pkg', 'fedsend_wasm_bg.wasm');
  return existsSync(bin) && statSync(bin).mtimeMs >= statSync(wasm).mtimeMs ? bin : null;
}

/** The native engine's trace of a shipped scenario: `fedsend scenario` (see nativeSource), else
 * the expected trace it is checked against. */
function nativeTrace(name) {
  const file = join(SCENARIOS, name);
  const bin = nativeSource();
  if (bin) {
    const r = spawnSync(bin, ['scenario', file], { encoding: 'utf8' });
    if (r.status === 0) return r.stdout;
    throw new Failure(`${bin} scenario ${name} failed: ${r.stderr.trim()}`);
  }
  return readFileSync(file.replace(/\.json$/, '.trace.jsonl'), 'utf8');
}

async function main(names) {
  const { chromium } = createRequire(join(ROOT, 'tools', 'node', 'package.json'))('playwright-core');
  mkdirSync(ARTIFACTS, { recursive: true });
  const { server, url } = await serve(WWW, { scenarios: SCENARIOS, npm: NPM });
  base = url;
  const profile = mkdtempSync(join(tmpdir(), 'fedsend-e2e-'));
  let context;
  let failed = 0;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      viewport: { width: 1440, height: 1000 },
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run'],
    });
    context.setDefaultTimeout(TIMEOUT_MS);
    for (const name of names) {
      const page = await context.newPage();
      const problems = [];
      page.on('console', (msg) => {
        if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
      });
      page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
      page.on('requestfailed', (req) => problems.push(`request failed: ${req.url()} (${req.failure()?.errorText})`));
      const t0 = Date.now();
      let result;
      try {
        result = await CHECKS[name](page);
      } catch (e) {
        problems.push(e instanceof Failure ? e.message : (e?.stack ?? String(e)).split('\n').slice(0, 3).join(' | '));
      }
      const secs = ((Date.now() - t0) / 1000).toFixed(1);
      if (problems.length) {
        failed += 1;
        console.log(`e2e ${name} FAIL (${secs} s): ${problems.join('; ')}`);
        await page.screenshot({ path: join(ARTIFACTS, `www-fail-${name}.png`), fullPage: true }).catch(() => {});
      } else {
        console.log(`e2e ${name} ok (${secs} s): ${result}`);
      }
      await page.close();
    }
  } finally {
    await context?.close();
    server.close();
    rmSync(profile, { recursive: true, force: true });
  }
  return failed;
}

if (process.env.NODE_TEST_CONTEXT) {
  const { test } = await import('node:test');
  test('browser e2e', { skip: 'run it on its own: node www/test/e2e.mjs' }, () => {});
} else {
  const wanted = process.argv.slice(2);
  const unknown = wanted.filter((n) => !(n in CHECKS));
  if (unknown.length) {
    console.log(`e2e: unknown check(s) ${unknown.join(', ')} (checks: ${Object.keys(CHECKS).join(', ')})`);
    process.exitCode = 2;
  } else {
    const names = wanted.length ? wanted : Object.keys(CHECKS);
    try {
      const failed = await main(names);
      console.log(failed ? `e2e FAIL: ${failed} of ${names.length} checks failed` : `e2e ok: ${names.length} checks passed`);
      process.exitCode = failed ? 1 : 0;
    } catch (e) {
      console.log(`e2e FAIL: ${e instanceof Error ? e.message.split('\n')[0] : e}`);
      process.exitCode = 1;
    }
  }
}
