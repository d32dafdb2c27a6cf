// The browser demo: runs a built-in scenario through the wasm core (the same simulator and
// core as `fedsend scenario`, driven across the JS boundary as JSON) and draws one card per
// destination from the trace. A time slider replays the trace line by line.

import init, { FederationSender, runScenario } from './pkg/fedsend_wasm.js';
import { senderEngine } from './lib/engine.mjs';
import { foldTrace, remoteServers } from './lib/trace.mjs';

const SCENARIO_URL = new URL('./scenarios/demo.json', import.meta.url);
const LOG_LINES = 14;
const REPLAY_MS = 8000;

const $ = (id) => document.getElementById(id);

/** Runs the scenario; returns the trace as text lines. Throws with the simulator's message. */
function simulate(scenarioText) {
  const lines = [];
  const engine = senderEngine(FederationSender);
  try {
    runScenario(scenarioText, engine, (line) => lines.push(line));
  } finally {
    engine.free();
  }
  return lines;
}

function formatMs(ms) {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(ms % 1000 ? 1 : 0)} s`;
  if (ms < 7_200_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

function renderCards(container, destinations, startMs) {
  const template = $('card');
  const cards = new Map([...container.children].map((el) => [el.dataset.destination, el]));
  for (const d of destinations) {
    let card = cards.get(d.destination);
    if (!card) {
      card = template.content.firstElementChild.cloneNode(true);
      card.dataset.destination = d.destination;
      card.querySelector('.name').textContent = d.destination;
      container.append(card);
    }
    card.dataset.state = d.state;
    card.dataset.sent = String(d.sent);
    card.querySelector('.state').textContent = d.state;
    card.querySelector('.sent').textContent = String(d.sent);
    card.querySelector('.ok').textContent = String(d.ok);
    card.querySelector('.failed').textContent = String(d.failed);
    card.querySelector('.items').textContent =
      `${d.pdus} PDUs · ${d.edus} EDUs` + (d.dropped ? ` · ${d.dropped} dropped` : '');
    const last = d.lastTxn;
    card.querySelector('.last').textContent = last
      ? `${last.txnId} at +${formatMs(last.t - startMs)}: ${last.outcome ?? 'in flight'}`
      : '–';
    const b = d.backoff;
    card.querySelector('.backoff').textContent = !b
      ? (d.lastError ? `last error: ${d.lastError.outcome}` : '–')
      : b.failure_ts == null
        ? 'healthy'
        : `failing since +${formatMs(b.failure_ts - startMs)}, retry every ${formatMs(b.retry_interval)}`;
  }
}

function draw(state, count) {
  const { t, destinations } = foldTrace(state.parsed, { known: state.known, count });
  renderCards($('destinations'), destinations, state.startMs);
  $('clock').textContent = t === null ? 't = –' : `t = +${formatMs(t - state.startMs)} · line ${count}/${state.parsed.length}`;
  $('trace').textContent = state.lines.slice(Math.max(0, count - LOG_LINES), count).join('\n');
}

function setUpTimeline(state) {
  const position = $('position');
  const play = $('play');
  position.max = String(state.parsed.length);
  position.value = position.max;
  position.disabled = false;
  play.disabled = false;
  position.addEventListener('input', () => draw(state, Number(position.value)));
  let timer = null;
  play.addEventListener('click', () => {
    clearInterval(timer);
    const total = state.parsed.length;
    let i = 0;
    const step = Math.max(1, Math.ceil(total / (REPLAY_MS / 50)));
    timer = setInterval(() => {
      i = Math.min(total, i + step);
      position.value = String(i);
      draw(state, i);
      if (i >= total) clearInterval(timer);
    }, 50);
  });
}

async function main() {
  const status = $('status');
  try {
    const [, scenarioText] = await Promise.all([init(), fetch(SCENARIO_URL).then((r) => {
      if (!r.ok) throw new Error(`${SCENARIO_URL.pathname}: HTTP ${r.status}`);
      return r.text();
    })]);
    const scenario = JSON.parse(scenarioText);
    $('server').textContent = scenario.server_name;
    const lines = simulate(scenarioText);
    const state = {
      lines,
      parsed: lines.map((line) => JSON.parse(line)),
      known: remoteServers(scenario),
      startMs: scenario.start_ms ?? 1_000_000,
    };
    draw(state, state.parsed.length);
    setUpTimeline(state);
    status.textContent = `ok: ${lines.length} trace lines`;
  } catch (e) {
    status.textContent = `error: ${e instanceof Error ? e.message : e}`;
    console.error(e);
  }
}

main();
