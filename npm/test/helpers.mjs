// Shared by the test files: the package under test, better-sqlite3 from tools/node (the
// pinned test tools; hosts install it next to the package), and a fake clock.

import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export * as fedsend from '../src/node.js';

const toolsRequire = createRequire(new URL('../../tools/node/package.json', import.meta.url));
export const Database = toolsRequire('better-sqlite3');

export function tempDir(t, prefix = 'fedsend-npm-') {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A virtual clock with setTimeout/clearTimeout: `advance(ms)` fires due timers in order. */
export class FakeClock {
  #now;
  #timers = new Map();
  #next = 1;
  constructor(startMs = 1_700_000_000_000) {
    this.#now = startMs;
  }
  now = () => this.#now;
  setTimeout = (fn, ms) => {
    const id = this.#next++;
    this.#timers.set(id, { at: this.#now + ms, fn });
    return id;
  };
  clearTimeout = (id) => {
    this.#timers.delete(id);
  };
  get pending() {
    return [...this.#timers.values()].map((t) => t.at).sort((a, b) => a - b);
  }
  /** Moves time forward, firing every timer due on the way (and letting promises settle). */
  async advance(ms) {
    const end = this.#now + ms;
    for (;;) {
      await settle();
      let due = null;
      for (const [id, timer] of this.#timers) {
        if (timer.at <= end && (due === null || timer.at < due[1].at)) due = [id, timer];
      }
      if (!due) break;
      this.#timers.delete(due[0]);
      this.#now = Math.max(this.#now, due[1].at);
      due[1].fn();
    }
    this.#now = end;
    await settle();
  }
}

/** Lets pending promise callbacks (and I/O-free async chains) run. */
export async function settle(rounds = 20) {
  for (let i = 0; i < rounds; i++) await new Promise((resolve) => setImmediate(resolve));
}
