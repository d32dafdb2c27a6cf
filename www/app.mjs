// The visualiser: the fedsend core compiled to wasm, with the simulated world, in the page.
//
// Two modes, chosen by the URL:
// - live (default; ?seed=&n=&rooms=&rate=&edus=&presence=&todevice=&devices=&speed=&select=&log=&worker=):
//   our server and N remote
//   servers in virtual time, a seeded workload, and controls to break the network and the
//   sender (lib/live.mjs: LiveRun). Same seed and actions → same run (the digest in the
//   summary); `log` records every action with its tick, so the URL replays the run.
// - replay (?scenario=NAME.json): a scenario file (shipped, picked, or dropped on the page)
//   stepped through with the native engine in wasm (lib/live.mjs: ScenarioReplay); its trace
//   is the one `fedsend scenario FILE` prints.
// Both draw the same Model (lib/draw.mjs) on canvases; the DOM carries the figures as text
// and data-* attributes (the e2e tests read those).

import init, { LiveSimulation, ScenarioStepper } from './pkg/fedsend_wasm.js';
import {
  DEFAULT_PARAMS, LiveRun, MIXES, ScenarioReplay, START_MS, TICK_MS, decodeLog, encodeLog, traceCounts,
} from './lib/live.mjs';
import { remoteServers, serverOf } from './lib/trace.mjs';
import { WorkerRun } from './lib/worker-run.mjs';
import { LABELS, STATES, drawLag, drawSeries, drawTimeline, drawWorld, forgetSize, formatMs, hit } from './lib/draw.mjs';

const $ = (id) => document.getElementById(id);
const url = new URL(location.href);
const q = url.searchParams;
const BUDGET_MS = 12; // simulation work per frame (ms) before virtual time is allowed to lag
const RENDER_MS = 33; // while the simulation runs, the least time between two drawings (see liveFrame)
const LOG_LINES = 16;

const ui = {
  mode: q.has('scenario') ? 'replay' : 'live',
  run: null, // LiveRun
  replay: null, // ScenarioReplay
  replayText: null,
  replayName: null,
  replayTimer: null,
  speed: 1,
  paused: false,
  selected: q.get('select'),
  geom: null,
  debt: 0,
  lastTs: null,
  renderedAt: -Infinity, // rAF time of the last drawing
  unsynced: false, // ticks run since the last sync
  frames: [], // { ms, virt, real }
  dirty: true,
  charted: null, // the newest sample the charts show (they change once per sample)
  // The world runs in a Web Worker (lib/sim-worker.mjs) and this thread folds and draws;
  // ?worker=0 runs it here, between the frames.
  worker: q.get('worker') !== '0' && typeof Worker === 'function',
  folded: 0, // ms spent folding the worker's batches since the last frame
  frameNow: null, // virtual time at the last frame (worker mode)
};

function intParam(name, fallback, min, max) {
  const v = Number(q.get(name));
  return q.has(name) && Number.isFinite(v) ? Math.min(max, Math.max(min, Math.floor(v))) : fallback;
}

function rateParam(name) {
  return Math.max(0, Number(q.get(name) ?? DEFAULT_PARAMS[name]) || 0);
}

/** EDU counts by type, most frequent first, as "3 m.typing, 1 m.presence". */
function kindsText(kinds) {
  return [...kinds].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map(([k, n]) => `${n} ${k}`).join(', ');
}

function setUrl(updates) {
  for (const [k, v] of Object.entries(updates)) {
    if (v === null || v === undefined) q.delete(k);
    else q.set(k, String(v));
  }
  history.replaceState(null, '', `${url.pathname}?${q}`);
}

function setStatus(text) {
  $('status').textContent = text;
}

function model() {
  return ui.mode === 'live' ? ui.run?.model : ui.replay?.model;
}

// ----- live mode -----

function startLive() {
  ui.run?.free();
  const params = {
    seed: intParam('seed', 1, 0, 2 ** 32 - 1),
    destinations: intParam('n', 30, 1, 1000),
    rooms: intParam('rooms', 4, 1, 50),
    rate: rateParam('rate'),
    ...Object.fromEntries(Object.keys(MIXES).map((mix) => [mix, rateParam(mix)])),
  };
  $('seed').value = params.seed;
  $('n').value = params.destinations;
  $('rooms').value = params.rooms;
  $('rate').value = params.rate;
  for (const mix of Object.keys(MIXES)) $(mix).value = params[mix];
  let schedule = [];
  try {
    schedule = decodeLog(q.get('log'));
  } catch (e) {
    console.warn(e);
    setUrl({ log: null });
  }
  ui.failed = false;
  ui.run = ui.worker
    ? new WorkerRun(params, schedule, {
      onBatch: (ms) => {
        ui.folded += ms;
        ui.dirty = true;
      },
      onError: (message) => {
        ui.failed = true;
        setSpeed(0);
        fail(new Error(message));
      },
    })
    : new LiveRun(LiveSimulation, params, schedule);
  ui.run.setSpeed?.(ui.speed, ui.paused);
  ui.frameNow = null;
  ui.logged = 0;
  ui.debt = 0;
  ui.frames = [];
  ui.unsynced = false;
  ui.renderedAt = -Infinity;
  fillDestinations(ui.run.model.order);
  if (ui.selected && !ui.run.model.dests.has(ui.selected)) ui.selected = null;
  $('pick').value = ui.selected ?? '';
  setPartitionLabel();
  setStatus(`ok: live, seed ${params.seed}, ${params.destinations} destinations, ${params.rooms} rooms`);
  render();
}

function setSpeed(speed) {
  ui.paused = speed === 0;
  if (speed > 0) ui.speed = speed;
  ui.run?.setSpeed?.(ui.speed, ui.paused);
  for (const b of document.querySelectorAll('[data-speed]')) b.classList.toggle('on', !ui.paused && Number(b.dataset.speed) === ui.speed);
  $('pause').classList.toggle('on', ui.paused);
  setUrl({ speed: ui.paused ? 0 : ui.speed });
}

function setPartitionLabel() {
  $('partition').textContent = ui.run?.partitioned ? 'heal partition' : 'partition';
}

function act(action) {
  if (!ui.run) return;
  ui.run.act(action);
  if (action.op === 'partition' || action.op === 'heal') {
    ui.run.partitioned = action.op === 'partition'; // for the label; the tick sets it again
    setPartitionLabel();
  }
  setStatus(`ok: ${action.op}${action.host ? ` ${action.host}` : ''} (applied at the next tick)`);
}

/** A frame with the world in the worker: the batches were folded as they came (`ui.folded`);
 * only the drawing is left. Frame time is the folding and drawing done on this thread. */
function workerFrame(ts) {
  const run = ui.run;
  const real = ui.lastTs === null ? 0 : Math.min(250, ts - ui.lastTs);
  ui.lastTs = ts;
  const t0 = performance.now();
  if (run.log.length !== ui.logged) {
    ui.logged = run.log.length;
    setUrl({ log: encodeLog(run.log) || null });
  }
  if (ui.dirty) render();
  const draw = performance.now() - t0;
  const fold = ui.folded;
  ui.folded = 0;
  const virt = ui.frameNow === null ? 0 : run.now - ui.frameNow;
  ui.frameNow = run.now;
  ui.frames.push({ ms: fold + draw, sim: 0, fold, draw, virt, real });
  if (ui.frames.length > 240) ui.frames.shift();
  showPerf();
}

function liveFrame(ts) {
  if (ui.worker) {
    workerFrame(ts);
    return;
  }
  const run = ui.run;
  const real = ui.lastTs === null ? 0 : Math.min(250, ts - ui.lastTs);
  ui.lastTs = ts;
  const t0 = performance.now();
  const v0 = run.now;
  if (!ui.paused) ui.debt += real * ui.speed;
  let ticks = Math.floor(ui.debt / TICK_MS);
  if (ticks > 0) {
    // One tick per call: a tick's cost is what the world does in it (a quiet tick takes
    // microseconds, one with an event for 300 servers milliseconds), so the budget is checked
    // after each and overshot by one tick at most.
    while (ticks > 0) {
      run.advance(1);
      ticks -= 1;
      ui.debt -= TICK_MS;
      if (performance.now() - t0 > BUDGET_MS) break;
    }
    if (ticks > 0) ui.debt = Math.min(ui.debt, TICK_MS); // over budget: virtual time lags instead of stuttering
    ui.unsynced = true;
  }
  const t1 = performance.now();
  let t2 = t1;
  // Folding the trace costs the same whenever it is done, but reading the core's figures of
  // 1 000 destinations and drawing them cost per call: while the simulation runs they are done
  // RENDER_MS apart, which leaves the frames between them to the simulation.
  if (ui.paused || ts - ui.renderedAt >= RENDER_MS || ts < ui.renderedAt) {
    if (ui.unsynced) {
      run.sync();
      ui.unsynced = false;
      ui.dirty = true;
    }
    t2 = performance.now();
    if (run.log.length !== ui.logged) {
      // The URL replays this run: seed, world, and every action at its tick.
      ui.logged = run.log.length;
      setUrl({ log: encodeLog(run.log) || null });
    }
    if (ui.dirty) {
      render();
      ui.renderedAt = ts;
    }
  }
  const t3 = performance.now();
  ui.frames.push({ ms: t3 - t0, sim: t1 - t0, fold: t2 - t1, draw: t3 - t2, virt: run.now - v0, real });
  if (ui.frames.length > 240) ui.frames.shift();
  if (t3 > t2) showPerf();
}

function showPerf() {
  const f = ui.frames.filter((x) => x.real > 0);
  if (f.length < 5) return;
  const ms = f.map((x) => x.ms).sort((a, b) => a - b);
  const mean = ms.reduce((a, b) => a + b, 0) / ms.length;
  const p95 = ms[Math.min(ms.length - 1, Math.floor(ms.length * 0.95))];
  const real = f.reduce((a, x) => a + x.real, 0);
  const virt = f.reduce((a, x) => a + x.virt, 0);
  const effective = real > 0 ? virt / real : 0;
  const el = $('perf');
  el.dataset.frameMean = mean.toFixed(2);
  el.dataset.frameP95 = p95.toFixed(2);
  el.dataset.frameMax = ms.at(-1).toFixed(2);
  el.dataset.frames = String(f.length);
  el.dataset.effectiveSpeed = effective.toFixed(2);
  const avg = (key) => (f.reduce((a, x) => a + x[key], 0) / f.length).toFixed(2);
  el.dataset.simMean = avg('sim');
  el.dataset.foldMean = avg('fold');
  el.dataset.drawMean = avg('draw');
  el.textContent = `· frame ${mean.toFixed(1)} ms (p95 ${p95.toFixed(1)}) · ${ui.paused ? 'paused' : `${ui.speed}× asked, ${effective.toFixed(1)}× run`}`;
}

// ----- replay mode -----

async function loadShippedList() {
  const pick = $('scenario-pick');
  const names = ['demo.json'];
  try {
    const r = await fetch('scenarios/shipped/index.json');
    if (r.ok) names.push(...(await r.json()));
  } catch {
    // A plain static server: only the demo and files picked or dropped.
  }
  pick.replaceChildren(...names.map((name) => new Option(name === 'demo.json' ? 'demo.json (www)' : name, name)));
}

function scenarioUrl(name) {
  return name === 'demo.json' ? 'scenarios/demo.json' : `scenarios/shipped/${encodeURIComponent(name)}`;
}

async function openScenario(name) {
  const r = await fetch(scenarioUrl(name));
  if (!r.ok) throw new Error(`${name}: HTTP ${r.status}`);
  loadReplay(await r.text(), name);
  setUrl({ scenario: name });
}

function loadReplay(text, name) {
  stopPlay();
  ui.replay?.free();
  ui.replay = null;
  ui.replayText = text;
  ui.replayName = name;
  let scenario;
  try {
    scenario = JSON.parse(text);
    ui.replay = new ScenarioReplay(ScenarioStepper, text, remoteServers(scenario), roomsOfScenario(scenario));
  } catch (e) {
    setStatus(`error: ${name}: ${e instanceof Error ? e.message : e}`);
    ui.dirty = true;
    return;
  }
  fillDestinations(ui.replay.model.order);
  if (ui.selected && !ui.replay.model.dests.has(ui.selected)) ui.selected = null;
  $('pick').value = ui.selected ?? '';
  setStatus(`ok: ${name}, ${ui.replay.stepCount} steps`);
  render();
}

/** The rooms each remote server joins in a scenario (its `join` steps). */
function roomsOfScenario(scenario) {
  const rooms = new Map();
  for (const step of scenario.steps ?? []) {
    const server = step.op === 'join' ? serverOf(step.user) : undefined;
    if (!server || server === scenario.server_name) continue;
    if (!rooms.has(server)) rooms.set(server, []);
    if (!rooms.get(server).includes(step.room)) rooms.get(server).push(step.room);
  }
  return rooms;
}

function replayStep(all = false) {
  const r = ui.replay;
  if (!r) return false;
  try {
    let more = r.step();
    while (all && more) more = r.step();
    if (!more) setStatus(`ok: ${ui.replayName}: end of trace, ${r.lines.length} lines`);
    render();
    return more;
  } catch (e) {
    setStatus(`error: ${ui.replayName}: ${e instanceof Error ? e.message : e}`);
    ui.replay.done = true;
    render();
    return false;
  }
}

function stopPlay() {
  clearInterval(ui.replayTimer);
  ui.replayTimer = null;
  $('r-play').textContent = '▶ play';
}

function renderReplayInfo() {
  const r = ui.replay;
  const pos = $('r-pos');
  const countsEl = $('r-counts');
  if (!r) {
    pos.textContent = '–';
    return;
  }
  pos.textContent = `step ${r.nextStep} / ${r.stepCount}${r.done ? ' · end' : ''} · t = +${formatMs(r.model.now - r.model.startMs)}`;
  pos.dataset.next = String(r.nextStep);
  pos.dataset.count = String(r.stepCount);
  pos.dataset.done = String(r.done);
  const counts = traceCounts(r.lines);
  for (const [k, v] of Object.entries(counts)) countsEl.dataset[k] = String(v);
  countsEl.textContent = `${counts.lines} lines · ${counts.persisted} persisted · ${counts.send} sends · ${counts.ok} ok · ${counts.failed} failed · ${counts.dropped} dropped`;
  $('trace').textContent = r.lines.slice(-LOG_LINES).join('\n');
}

// ----- drawing and the DOM -----

function fillDestinations(names) {
  $('dest-list').replaceChildren(...names.map((n) => new Option(n)));
}

function select(name) {
  const m = model();
  ui.selected = m?.dests.has(name) ? name : null;
  $('pick').value = ui.selected ?? '';
  setUrl({ select: ui.selected });
  render();
}

function render() {
  ui.dirty = false;
  const m = model();
  if (!m) return;
  ui.geom = drawWorld($('world'), m, {
    selected: ui.selected,
    restartedAt: ui.mode === 'live' ? ui.run.restartedAt : null,
  });
  const totals = m.totals();
  const summary = $('summary');
  for (const s of STATES) summary.querySelector(`[data-count="${s}"]`).textContent = String(totals.states[s] ?? 0);
  $('delivered').textContent = String(totals.delivered);
  $('edus-delivered').textContent = String(totals.edus);
  $('edu-kinds').textContent = m.eduKinds.size ? `(${kindsText(m.eduKinds)})` : '';
  $('edu-kinds').dataset.kinds = JSON.stringify(Object.fromEntries(m.eduKinds));
  $('queued').textContent = String(totals.queued);
  $('inflight').textContent = String(totals.inFlight);
  $('converged').textContent = `${totals.converged} / ${totals.total}`;
  $('lagmax').textContent = formatMs(totals.lagMax);
  Object.assign(summary.dataset, {
    delivered: totals.delivered, edus: totals.edus, queued: totals.queued, inflight: totals.inFlight, converged: totals.converged,
    total: totals.total, sends: m.counts.send, now: m.now - m.startMs, digest: m.digest.toString(16).padStart(8, '0'),
    ...Object.fromEntries(STATES.map((s) => [`state${s.replace(/(^|_)(\w)/g, (_, __, c) => c.toUpperCase())}`, totals.states[s] ?? 0])),
  });
  $('clock').textContent = `t = +${formatMs(m.now - m.startMs)}`;
  // The charts change once per sample (a virtual second): redrawing them every frame at 100×
  // with 1 000 destinations cost about as much as drawing the world's grid.
  if (ui.charted !== m.samples.at(-1)) {
    ui.charted = m.samples.at(-1);
    drawSeries($('series'), m.samples);
    drawLag($('lag'), m);
  }
  renderDetail(m);
  if (ui.mode === 'replay') renderReplayInfo();
}

function renderDetail(m) {
  const d = ui.selected ? m.dests.get(ui.selected) : null;
  const detail = $('detail');
  for (const b of detail.querySelectorAll('[data-action]')) b.disabled = !d || ui.mode !== 'live';
  // Live: the last two minutes; a replay: the whole run (scenarios span hours).
  drawTimeline($('timeline'), m, d, ui.mode === 'live' ? 120_000 : Math.max(120_000, m.now - m.startMs));
  if (!d) {
    delete detail.dataset.dest;
    for (const id of ['d-state', 'd-queue', 'd-backoff', 'd-catchup', 'd-txns', 'd-received']) $(id).textContent = '–';
    $('d-attempts').replaceChildren();
    $('d-backoffs').replaceChildren();
    return;
  }
  const s = d.stats;
  const p = m.progress(d);
  Object.assign(detail.dataset, {
    dest: d.name, state: d.state, queued: s?.queued_pdus ?? 0, converged: p.converged, delivered: d.delivered,
    dropped: d.dropped, backoffs: d.backoffs.length, failed: d.failed,
  });
  $('d-state').textContent = LABELS[d.state] + (s?.in_flight ? ' · a transaction in flight' : '');
  $('d-state').className = `st-${d.state}`;
  $('d-queue').textContent = `${s?.queued_pdus ?? 0} PDUs` +
    (s?.oldest_pending_age_ms != null ? ` · oldest ${formatMs(s.oldest_pending_age_ms)}` : '');
  $('d-backoff').textContent = s?.backoff_until_ts
    ? `retry in ${formatMs(s.backoff_until_ts - m.now)} (interval ${formatMs(s.retry_interval_ms)}, failing since +${formatMs(s.failure_ts - m.startMs)})`
    : s?.failure_ts ? `failing since +${formatMs(s.failure_ts - m.startMs)}` : 'none';
  $('d-catchup').textContent = p.converged
    ? `up to date in ${d.rooms.length || '–'} room(s)`
    : `${p.roomsBehind} of ${d.rooms.length} room(s) behind · lag ${formatMs(p.lagMs)}${s?.catching_up ? ' · catching up from storage' : ''}`;
  $('d-txns').textContent = `${d.sent} sent · ${d.ok} ok · ${d.failed} failed · ${d.dropped} dropped`;
  const rooms = d.rooms.map((room) => `${room.replace(/:.*/, '')} #${d.received.get(room) ?? '–'}`).join(', ');
  const kinds = d.eduKinds.size ? ` (${kindsText(d.eduKinds)})` : '';
  $('d-received').textContent = `${d.delivered} PDUs, ${d.edusDelivered} EDUs${kinds}${d.lastReceived ? `, last ${d.lastReceived}` : ''}${rooms ? ` · newest per room: ${rooms}` : ''}`;
  $('d-received').dataset.kinds = JSON.stringify(Object.fromEntries(d.eduKinds));
  $('d-attempts').replaceChildren(...d.attempts.slice(-8).reverse().map((a) => {
    const li = document.createElement('li');
    li.textContent = `+${formatMs(a.t - m.startMs)} ${a.txnId}: ${a.pdus} PDU · ${a.edus} EDU → ${a.outcome ?? 'in flight'}`;
    li.title = a.eduTypes?.length ? a.eduTypes.join(', ') : '';
    li.className = a.outcome === null ? 'pending' : a.outcome.startsWith('ok') ? 'ok' : 'bad';
    return li;
  }));
  $('d-backoffs').replaceChildren(...d.backoffs.slice(-6).reverse().map((b) => {
    const li = document.createElement('li');
    li.textContent = `+${formatMs(b.t - m.startMs)}: back off ${formatMs(b.interval)}, until +${formatMs(b.until - m.startMs)}`;
    return li;
  }));
}

function loop(ts) {
  try {
    if (ui.mode === 'live' && ui.run && !ui.failed) liveFrame(ts);
    else if (ui.dirty) render();
  } catch (e) {
    // The world refused a step (or the engine failed): stop here and say so.
    ui.failed = true;
    setSpeed(0);
    fail(e);
  }
  requestAnimationFrame(loop);
}

// ----- wiring -----

function wireLive() {
  $('live-controls').hidden = false;
  $('mode-live').classList.add('on');
  $('reset').addEventListener('click', () => {
    setUrl({
      seed: $('seed').value, n: $('n').value, rooms: $('rooms').value, rate: $('rate').value,
      ...Object.fromEntries(Object.keys(MIXES).map((mix) => [mix, $(mix).value])), log: null,
    });
    startLive();
  });
  // A rate changed mid-run is an action (the URL's `log` keeps it with its tick); the
  // starting rates are the URL's parameters.
  for (const mix of Object.keys(MIXES)) {
    $(mix).addEventListener('change', () => act({ op: mix, value: Number($(mix).value) }));
  }
  $('rate').addEventListener('change', () => {
    act({ op: 'rate', value: Number($('rate').value) }); // the URL's `log` keeps it, with its tick
  });
  $('pause').addEventListener('click', () => setSpeed(0));
  for (const b of document.querySelectorAll('[data-speed]')) b.addEventListener('click', () => setSpeed(Number(b.dataset.speed)));
  $('step').addEventListener('click', () => {
    setSpeed(0);
    if (ui.failed) return;
    try {
      ui.run.run(1000 / TICK_MS); // with the worker, the batch arrives and is drawn later
      ui.dirty = true;
      liveFrame(performance.now());
    } catch (e) {
      ui.failed = true;
      fail(e);
    }
  });
  $('restart').addEventListener('click', () => act({ op: 'restart' }));
  $('partition').addEventListener('click', () => act({ op: ui.run.partitioned ? 'heal' : 'partition' }));
  for (const b of document.querySelectorAll('#actions [data-action]')) {
    b.addEventListener('click', () => ui.selected && act({ op: b.dataset.action, host: ui.selected }));
  }
  startLive();
  setSpeed(q.has('speed') ? Math.max(0, Number(q.get('speed')) || 0) : 1);
}

async function wireReplay() {
  $('replay-controls').hidden = false;
  $('replay-trace').hidden = false;
  $('mode-replay').classList.add('on');
  await loadShippedList();
  const pick = $('scenario-pick');
  pick.addEventListener('change', () => openScenario(pick.value).catch(fail));
  $('scenario-file').addEventListener('change', async (e) => {
    const file = e.target.files?.[0];
    if (file) loadReplay(await file.text(), file.name);
  });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', async (e) => {
    e.preventDefault();
    const file = e.dataTransfer?.files?.[0];
    if (file) loadReplay(await file.text(), file.name);
  });
  $('r-step').addEventListener('click', () => replayStep());
  $('r-end').addEventListener('click', () => {
    stopPlay();
    replayStep(true);
  });
  $('r-reset').addEventListener('click', () => ui.replayText !== null && loadReplay(ui.replayText, ui.replayName));
  $('r-play').addEventListener('click', () => {
    if (ui.replayTimer) {
      stopPlay();
      return;
    }
    $('r-play').textContent = '⏸ pause';
    ui.replayTimer = setInterval(() => {
      if (!replayStep()) stopPlay();
    }, 250);
  });
  const name = q.get('scenario') || 'demo.json';
  if (![...pick.options].some((o) => o.value === name)) pick.add(new Option(name, name));
  pick.value = name;
  await openScenario(name);
}

function fail(e) {
  setStatus(`error: ${e instanceof Error ? e.message : e}`);
  console.error(e);
}

async function main() {
  await init();
  $('world').addEventListener('click', (e) => {
    const m = model();
    if (!m || !ui.geom) return;
    const rect = e.currentTarget.getBoundingClientRect();
    const i = hit(ui.geom, m.order.length, e.clientX - rect.left, e.clientY - rect.top);
    if (i >= 0) select(m.order[i]);
  });
  $('pick').addEventListener('change', () => select($('pick').value.trim()));
  const resized = (canvases) => {
    for (const canvas of canvases) forgetSize(canvas);
    ui.charted = null;
    ui.dirty = true;
  };
  const canvases = [...document.querySelectorAll('canvas')];
  const observer = new ResizeObserver((entries) => resized(entries.map((e) => e.target)));
  for (const canvas of canvases) observer.observe(canvas);
  // The device pixel ratio (zoom) changes the backing store, not the CSS box.
  window.addEventListener('resize', () => resized(canvases));
  if (ui.mode === 'live') wireLive();
  else await wireReplay();
  // For tests and the curious: the state behind the drawing.
  window.fedsend = { ui, START_MS };
  requestAnimationFrame(loop);
}

main().catch(fail);
