// The page's side of a live run in a Web Worker (lib/sim-worker.mjs): the same surface as
// LiveRun (model, now, log, act, run, partitioned, restartedAt) for app.mjs, with the world
// elsewhere. Batches of trace and figures arrive as messages and are folded into the Model
// here; each is acknowledged once folded, so a page that cannot keep up gets fewer, larger
// batches instead of a growing queue.

import { DEFAULT_PARAMS, Model, START_MS, buildWorld } from './live.mjs';

export class WorkerRun {
  /** `onBatch(foldMs)`: called after each batch is folded; `onError(message)`: the world failed. */
  constructor(params, schedule, { onBatch = () => {}, onError = () => {} } = {}) {
    this.params = { ...DEFAULT_PARAMS, ...params };
    this.world = buildWorld(this.params);
    this.model = new Model({ names: this.world.names, roomsOf: this.world.roomsOf });
    this.now = START_MS;
    this.log = [];
    this.partitioned = false;
    this.restartedAt = null;
    this.lastSample = -Infinity;
    this.simMs = 0; // the worker's simulation time so far
    this.worker = new Worker(new URL('./sim-worker.mjs', import.meta.url), { type: 'module' });
    this.worker.onmessage = (e) => {
      const m = e.data;
      if (m.type === 'error') {
        onError(m.message);
        return;
      }
      const t0 = performance.now();
      this.fold(m);
      this.worker.postMessage({ type: 'ack' });
      onBatch(performance.now() - t0);
    };
    this.worker.onerror = (e) => onError(e.message);
    this.worker.postMessage({ type: 'start', params: this.params, schedule });
  }

  fold(m) {
    // Lines come parsed (the worker's digest is over their text, as addTraceText's would be).
    for (const line of m.lines) this.model.addLine(line);
    this.model.digest = m.digest;
    this.now = m.now;
    if (m.stats !== null) this.model.setStats(m.stats, m.now);
    else this.model.now = Math.max(this.model.now, m.now);
    this.log.push(...m.log);
    this.partitioned = m.partitioned;
    this.restartedAt = m.restartedAt;
    this.simMs = m.simMs;
    if (this.model.now - this.lastSample >= 1000) {
      this.lastSample = this.model.now;
      this.model.sample();
    }
  }

  act(action) {
    this.worker.postMessage({ type: 'act', action });
  }

  setSpeed(speed, paused) {
    this.worker.postMessage({ type: 'speed', speed, paused });
  }

  /** Runs `ticks` ticks at once (the "step" button); the result arrives as a batch. */
  run(ticks) {
    this.worker.postMessage({ type: 'step', ticks });
  }

  free() {
    this.worker.terminate();
  }
}
