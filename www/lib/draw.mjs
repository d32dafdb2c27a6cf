// Canvas drawing of the visualiser: the world (our server and every destination), the
// attempt timeline of one destination, and the charts. Reads a `Model` (lib/live.mjs); no
// other DOM than the canvases it is given.

export const COLORS = {
  idle: '#2f855a',
  sending: '#2b6cb0',
  retrying: '#dd6b20',
  backing_off: '#c53030',
  catching_up: '#805ad5',
  gone: '#4a5568',
};
export const STATES = Object.keys(COLORS);
export const LABELS = {
  idle: 'idle', sending: 'sending', retrying: 'retrying', backing_off: 'backing off', catching_up: 'catching up', gone: 'gone',
};

const HOME_W = 120;

export function formatMs(ms) {
  if (ms === null || ms === undefined) return '–';
  const a = Math.abs(ms);
  if (a < 1000) return `${Math.round(ms)} ms`;
  if (a < 120_000) return `${(ms / 1000).toFixed(1)} s`;
  if (a < 7_200_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

// Each canvas's CSS box, read once and kept until `forgetSize`: reading clientWidth after the
// page has written text forces a synchronous layout, and with a canvas drawn many times per
// frame that was a large part of a frame at 1 000 destinations. The page forgets a size when
// a ResizeObserver reports a change.
const sizes = new WeakMap();

/** Drops the remembered CSS size of `canvas` (it was resized). */
export function forgetSize(canvas) {
  sizes.delete(canvas);
}

/** Sizes `canvas` to its CSS box at the device pixel ratio; returns its 2D context in CSS px. */
export function fit(canvas) {
  const dpr = globalThis.devicePixelRatio || 1;
  let size = sizes.get(canvas);
  if (!size) {
    size = { w: Math.max(1, Math.round(canvas.clientWidth)), h: Math.max(1, Math.round(canvas.clientHeight)) };
    sizes.set(canvas, size);
  }
  const { w, h } = size;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return { ctx, w, h };
}

/** The grid of `n` cells in a `w`×`h` box right of our server's column. */
export function layout(n, w, h) {
  const gw = Math.max(10, w - HOME_W - 10);
  let cols = Math.max(1, Math.ceil(Math.sqrt((n * gw) / Math.max(1, h))));
  let rows = Math.ceil(n / cols);
  while (rows * (gw / cols) > h * 1.05 && cols < n) {
    cols += 1;
    rows = Math.ceil(n / cols);
  }
  const cw = Math.min(gw / cols, 190);
  const ch = Math.min(h / Math.max(1, rows), cw * 0.75, 88);
  return { cols, rows, cw, ch, x0: HOME_W + 10, y0: 0 };
}

/** Which destination index is at (x, y) in CSS px, or -1. */
export function hit(geom, n, x, y) {
  const col = Math.floor((x - geom.x0) / geom.cw);
  const row = Math.floor((y - geom.y0) / geom.ch);
  if (col < 0 || col >= geom.cols || row < 0) return -1;
  const i = row * geom.cols + col;
  return i < n ? i : -1;
}

/** Draws our server and the destinations. Returns the geometry (for hit tests). */
export function drawWorld(canvas, model, { selected = null, home = 'home.example', restartedAt = null } = {}) {
  const { ctx, w, h } = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  const names = model.order;
  const n = names.length;
  const geom = layout(n, w, h);
  const now = model.now;
  const big = geom.cw >= 104 && geom.ch >= 50;
  const medium = !big && geom.cw >= 40 && geom.ch >= 24;

  // Our server.
  const hx = 6;
  const hy = Math.max(4, Math.min(h / 2, (geom.rows * geom.ch) / 2) - 40);
  const flash = restartedAt !== null && now - restartedAt < 5_000;
  ctx.fillStyle = flash ? '#fefcbf' : '#edf2f7';
  ctx.strokeStyle = '#2d3748';
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  ctx.roundRect(hx, hy, HOME_W - 12, 80, 8);
  ctx.fill();
  ctx.stroke();
  ctx.fillStyle = '#1a202c';
  ctx.font = '600 12px system-ui, sans-serif';
  ctx.textAlign = 'center';
  ctx.fillText(home, hx + (HOME_W - 12) / 2, hy + 24);
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillText('fedsend (wasm)', hx + (HOME_W - 12) / 2, hy + 42);
  if (flash) ctx.fillText('restarted', hx + (HOME_W - 12) / 2, hy + 60);
  const ox = hx + HOME_W - 12;
  const oy = hy + 40;

  const cellOf = (i) => {
    const col = i % geom.cols;
    const row = Math.floor(i / geom.cols);
    return { x: geom.x0 + col * geom.cw, y: geom.y0 + row * geom.ch };
  };

  ctx.textAlign = 'left';
  const pad = n > 400 ? 0.5 : 2;
  for (let i = 0; i < n; i += 1) {
    const d = model.dests.get(names[i]);
    const { x, y } = cellOf(i);
    const cw = geom.cw - pad * 2;
    const ch = geom.ch - pad * 2;
    const s = d.stats;
    // Sending but nothing in flight: waiting for a slot under the global cap (D11).
    const waiting = d.state === 'sending' && s && !s.in_flight;
    const color = waiting ? '#90cdf4' : COLORS[d.state] ?? '#718096';
    if (big || medium) {
      ctx.fillStyle = '#fff';
      ctx.fillRect(x + pad, y + pad, cw, ch);
      ctx.fillStyle = color;
      ctx.fillRect(x + pad, y + pad, 5, ch);
      ctx.fillStyle = `${color}22`;
      ctx.fillRect(x + pad + 5, y + pad, cw - 5, ch);
    } else {
      ctx.fillStyle = color;
      ctx.fillRect(x + pad, y + pad, cw, ch);
    }
    // Queue depth: a bar along the bottom, log scale (1 → 10 000 PDUs).
    const q = s?.queued_pdus ?? 0;
    if (q > 0) {
      const f = Math.min(1, Math.log10(q + 1) / 4);
      ctx.fillStyle = big || medium ? '#d69e2e' : 'rgba(255,255,255,0.85)';
      ctx.fillRect(x + pad, y + pad + ch - Math.max(2, ch * 0.12), cw * f, Math.max(2, ch * 0.12));
    }
    // Backoff countdown: a shrinking pie.
    if (s?.backoff_until_ts && s.retry_interval_ms > 0) {
      const left = Math.max(0, s.backoff_until_ts - now);
      const f = Math.min(1, left / s.retry_interval_ms);
      const r = Math.max(2, Math.min(cw, ch) * (big ? 0.14 : 0.3));
      const cx = x + pad + cw - r - (big ? 4 : 1);
      const cy = big ? y + pad + ch - r - 8 : y + pad + r + 1;
      ctx.fillStyle = big || medium ? 'rgba(197,48,48,0.75)' : 'rgba(255,255,255,0.8)';
      ctx.beginPath();
      ctx.moveTo(cx, cy);
      ctx.arc(cx, cy, r, -Math.PI / 2, -Math.PI / 2 + f * Math.PI * 2);
      ctx.closePath();
      ctx.fill();
    }
    if (!big && !medium && s?.in_flight) {
      ctx.fillStyle = '#fff';
      ctx.fillRect(x + pad + cw * 0.3, y + pad + ch * 0.3, Math.max(1, cw * 0.4), Math.max(1, ch * 0.4));
    }
    if (big) {
      ctx.fillStyle = '#1a202c';
      ctx.font = '600 11px system-ui, sans-serif';
      ctx.fillText(d.name.replace(/\.example$/, ''), x + pad + 9, y + pad + 13);
      ctx.fillStyle = waiting ? COLORS.sending : color;
      ctx.font = '700 10px system-ui, sans-serif';
      ctx.fillText(LABELS[d.state].toUpperCase() + (waiting ? ' (slot wait)' : ''), x + pad + 9, y + pad + 26);
      ctx.fillStyle = '#2d3748';
      ctx.font = '10px system-ui, sans-serif';
      const age = s?.oldest_pending_age_ms;
      ctx.fillText(`q ${q}${age != null ? ` · ${formatMs(age)}` : ''}`, x + pad + 9, y + pad + 38);
      let extra = `✓ ${d.delivered}`;
      if (s?.backoff_until_ts) extra = `retry in ${formatMs(s.backoff_until_ts - now)}`;
      else if (s?.in_flight && d.inFlight) extra = `→ ${d.inFlight.pdus} PDU · ${d.inFlight.edus} EDU`;
      ctx.fillText(extra, x + pad + 9, y + pad + 50);
    } else if (medium) {
      ctx.fillStyle = '#1a202c';
      ctx.font = '9px system-ui, sans-serif';
      ctx.fillText(d.name.replace(/\.example$/, ''), x + pad + 7, y + pad + 11);
    }
    if (d.name === selected) {
      ctx.strokeStyle = '#000';
      ctx.lineWidth = 2.5;
      ctx.strokeRect(x + pad + 1, y + pad + 1, cw - 2, ch - 2);
    }
  }
  // Transactions in flight: a line to the destination and a packet on it.
  if (n <= 120) {
    ctx.lineWidth = 1;
    for (let i = 0; i < n; i += 1) {
      const d = model.dests.get(names[i]);
      const a = d.inFlight;
      if (!a || !d.stats?.in_flight) continue;
      const { x, y } = cellOf(i);
      const tx = x + 2;
      const ty = y + geom.ch / 2;
      ctx.strokeStyle = 'rgba(43,108,176,0.35)';
      ctx.beginPath();
      ctx.moveTo(ox, oy);
      ctx.lineTo(tx, ty);
      ctx.stroke();
      const f = Math.min(0.92, Math.max(0.05, (now - a.t) / 400));
      const px = ox + (tx - ox) * f;
      const py = oy + (ty - oy) * f;
      ctx.fillStyle = COLORS.sending;
      ctx.beginPath();
      ctx.arc(px, py, 3.5, 0, Math.PI * 2);
      ctx.fill();
      if (n <= 60) {
        ctx.font = '10px system-ui, sans-serif';
        ctx.textAlign = 'left';
        ctx.fillText(`${a.pdus}P·${a.edus}E`, px + 5, py - 4);
      }
    }
  }

  return geom;
}

/** The attempts and backoffs of one destination over the last `spanMs` of virtual time. */
export function drawTimeline(canvas, model, d, spanMs = 120_000) {
  const { ctx, w, h } = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = '#f7fafc';
  ctx.fillRect(0, 0, w, h);
  if (!d) return;
  const end = model.now;
  const start = end - spanMs;
  const X = (t) => ((t - start) / spanMs) * w;
  for (const b of d.backoffs) {
    if (b.until < start) continue;
    ctx.fillStyle = 'rgba(197,48,48,0.15)';
    ctx.fillRect(X(b.t), 0, Math.max(1, X(b.until) - X(b.t)), h);
  }
  for (const a of d.attempts) {
    if ((a.done ?? end) < start) continue;
    const ok = a.outcome?.startsWith('ok');
    ctx.fillStyle = a.outcome === null ? COLORS.sending : ok ? COLORS.idle : COLORS.backing_off;
    const x = X(a.t);
    ctx.fillRect(x, ok ? h * 0.2 : h * 0.5, Math.max(2, X(a.done ?? end) - x), h * 0.3);
  }
  ctx.fillStyle = '#4a5568';
  ctx.font = '10px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.fillText(`−${formatMs(spanMs)}`, 2, h - 3);
  ctx.textAlign = 'right';
  ctx.fillText('now', w - 2, h - 3);
}

/** Delivered, queued and in flight over time: three strips, each with its own scale. */
export function drawSeries(canvas, samples) {
  const { ctx, w, h } = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  const series = [
    ['delivered PDUs', (s) => s.delivered, COLORS.idle],
    ['queued PDUs', (s) => s.queued, '#d69e2e'],
    ['in flight', (s) => s.inFlight, COLORS.sending],
  ];
  const stripH = h / series.length;
  series.forEach(([label, get, color], k) => {
    const top = k * stripH;
    ctx.fillStyle = k % 2 ? '#f7fafc' : '#fff';
    ctx.fillRect(0, top, w, stripH);
    const values = samples.map(get);
    const max = Math.max(1, ...values);
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = samples.length < 2 ? 0 : (i / (samples.length - 1)) * w;
      const y = top + stripH - 4 - (v / max) * (stripH - 16);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = '#2d3748';
    ctx.font = '11px system-ui, sans-serif';
    ctx.textAlign = 'left';
    ctx.fillText(`${label}: ${values.at(-1) ?? 0} (max ${max})`, 4, top + 12);
  });
}

/** Delivery lag of each destination (grid order), log scale, coloured by state. */
export function drawLag(canvas, model) {
  const { ctx, w, h } = fit(canvas);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, w, h);
  const names = model.order;
  const bw = w / Math.max(1, names.length);
  let max = 0;
  names.forEach((name, i) => {
    const d = model.dests.get(name);
    const lag = (d.progress ?? model.progress(d)).lagMs;
    max = Math.max(max, lag);
    if (lag <= 0) return;
    const f = Math.min(1, Math.log10(lag / 100 + 1) / Math.log10(36_000 + 1)); // 100 ms … 1 h
    ctx.fillStyle = COLORS[d.state];
    ctx.fillRect(i * bw, h - 4 - f * (h - 18), Math.max(1, bw - (bw > 3 ? 1 : 0)), f * (h - 18));
  });
  ctx.fillStyle = '#2d3748';
  ctx.font = '11px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.fillText(`delivery lag per destination (log, up to 1 h) · max ${formatMs(max)}`, 4, 12);
}
