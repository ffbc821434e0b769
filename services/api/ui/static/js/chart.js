// Live charts drawn by hand as SVG (no library): per-second buckets in a ring buffer (memory
// stays bounded however long the page is open), a stacked bar chart of flows/s by status
// class and a line chart of upstream latency percentiles. Every chart exposes its numbers
// as data attributes (data-total-2xx, data-points, ...) so tests and curious people can
// read what is drawn.

const SVG = "http://www.w3.org/2000/svg";
export const CLASSES = ["2xx", "3xx", "4xx", "5xx", "error"];
export const COLORS = { "2xx": "#22c55e", "3xx": "#3b82f6", "4xx": "#f59e0b", "5xx": "#ef4444", error: "#7f1d1d", p50: "#2563eb", p95: "#db2777" };
const MAX_SAMPLES = 256; // latency samples kept per second (a reservoir past that)

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v !== undefined && v !== null && v !== false) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// The status class of a final flow event: 2xx..5xx, or "error" (an error or a kill, no status).
export function classOf(ev) {
  const status = ev.response?.status ?? ev.status;
  if (ev.event === "error" || ev.event === "killed" || !status) return "error";
  const c = `${Math.floor(status / 100)}xx`;
  return CLASSES.includes(c) ? c : "error";
}

// Upstream latency of a flow event in ms: first byte of the response after the request was sent.
export function latencyOf(ev) {
  const t = ev.timings ?? {};
  if (typeof t.first_byte !== "number" || typeof t.request_sent !== "number") return null;
  const ms = (t.first_byte - t.request_sent) * 1000;
  return ms >= 0 ? ms : null;
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

// Per-second buckets of the last `seconds` seconds: counts by class and latency samples.
export class SecondSeries {
  constructor(seconds = 180) {
    this.seconds = seconds;
    this.ring = new Array(seconds).fill(null);
    this.seen = 0; // flows counted since the page opened
    this.lastAt = 0;
  }

  bucket(sec) {
    const i = sec % this.seconds;
    let b = this.ring[i];
    if (!b || b.sec !== sec) {
      b = { sec, counts: Object.fromEntries(CLASSES.map((c) => [c, 0])), lat: [], latSeen: 0 };
      this.ring[i] = b;
    }
    return b;
  }

  add(ev, nowMs = Date.now()) {
    const b = this.bucket(Math.floor(nowMs / 1000));
    b.counts[classOf(ev)] += 1;
    const ms = latencyOf(ev);
    if (ms !== null) {
      b.latSeen += 1;
      if (b.lat.length < MAX_SAMPLES) b.lat.push(ms);
      else { const j = Math.floor(Math.random() * b.latSeen); if (j < MAX_SAMPLES) b.lat[j] = ms; }
    }
    this.seen += 1;
    this.lastAt = nowMs;
  }

  // One point per second, oldest first, ending at the current second.
  points(nowMs = Date.now()) {
    const now = Math.floor(nowMs / 1000);
    const out = [];
    for (let sec = now - this.seconds + 1; sec <= now; sec++) {
      const b = this.ring[((sec % this.seconds) + this.seconds) % this.seconds];
      const live = b && b.sec === sec ? b : null;
      const counts = live ? live.counts : Object.fromEntries(CLASSES.map((c) => [c, 0]));
      let p50 = null, p95 = null;
      if (live && live.lat.length) {
        const sorted = [...live.lat].sort((a, b2) => a - b2);
        p50 = quantile(sorted, 0.5);
        p95 = quantile(sorted, 0.95);
      }
      out.push({ sec, counts, total: CLASSES.reduce((n, c) => n + counts[c], 0), p50, p95, samples: live ? live.lat.length : 0 });
    }
    return out;
  }
}

const W = 600, H = 140, PAD = { l: 36, r: 8, t: 8, b: 18 };

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axes(svg, max, fmt, first, last) {
  const ih = H - PAD.t - PAD.b;
  for (const f of [0, 0.5, 1]) {
    const y = PAD.t + ih * (1 - f);
    svg.append(s("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, stroke: "#e5e7eb", "stroke-width": 1 }));
    svg.append(s("text", { x: PAD.l - 4, y: y + 3, "text-anchor": "end" }, fmt(max * f)));
  }
  svg.append(s("text", { x: PAD.l, y: H - 4 }, `-${last - first + 1}s`));
  svg.append(s("text", { x: W - PAD.r, y: H - 4, "text-anchor": "end" }, "now"));
}

function frame(svg, label) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
}

// Flows per second, stacked by status class.
export function drawRate(svg, points) {
  frame(svg, "flows per second by status class");
  const totals = Object.fromEntries(CLASSES.map((c) => [c, 0]));
  let peak = 0;
  for (const p of points) {
    for (const c of CLASSES) totals[c] += p.counts[c];
    peak = Math.max(peak, p.total);
  }
  const max = niceMax(peak);
  axes(svg, max, (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)), points[0]?.sec ?? 0, points.at(-1)?.sec ?? 0);
  const iw = W - PAD.l - PAD.r, ih = H - PAD.t - PAD.b;
  const bw = iw / Math.max(1, points.length);
  const bars = s("g", { class: "bars" });
  points.forEach((p, i) => {
    if (!p.total) return;
    let y = PAD.t + ih;
    for (const c of CLASSES) {
      const n = p.counts[c];
      if (!n) continue;
      const hgt = (n / max) * ih;
      y -= hgt;
      bars.append(s("rect", { x: (PAD.l + i * bw).toFixed(2), y: y.toFixed(2), width: Math.max(1, bw - 0.5).toFixed(2), height: hgt.toFixed(2), fill: COLORS[c] },
        s("title", null, `${new Date(p.sec * 1000).toLocaleTimeString(undefined, { hour12: false })}: ${n} ${c}`)));
    }
  });
  svg.append(bars);
  const all = CLASSES.reduce((n, c) => n + totals[c], 0);
  for (const c of CLASSES) svg.setAttribute(`data-total-${c}`, String(totals[c]));
  svg.dataset.total = String(all);
  svg.dataset.points = String(points.filter((p) => p.total).length);
  svg.dataset.peak = String(peak);
  return totals;
}

// Upstream latency: p50 and p95 per second (seconds without a sample leave a gap).
export function drawLatency(svg, points) {
  frame(svg, "upstream latency p50 and p95 per second");
  let peak = 0, samples = 0, withData = 0;
  for (const p of points) {
    if (p.p95 !== null) { peak = Math.max(peak, p.p95); withData += 1; }
    samples += p.samples;
  }
  const max = niceMax(peak);
  axes(svg, max, (v) => (v === 0 ? "0" : v >= 1000 ? `${(v / 1000).toFixed(1)}s` : v < 10 ? `${v.toFixed(1)}ms` : `${Math.round(v)}ms`), points[0]?.sec ?? 0, points.at(-1)?.sec ?? 0);
  const iw = W - PAD.l - PAD.r, ih = H - PAD.t - PAD.b;
  const step = iw / Math.max(1, points.length);
  for (const key of ["p95", "p50"]) {
    let d = "";
    let pen = false;
    const dots = s("g", { fill: COLORS[key] });
    points.forEach((p, i) => {
      const v = p[key];
      if (v === null) { pen = false; return; }
      const x = (PAD.l + (i + 0.5) * step).toFixed(2);
      const y = (PAD.t + ih * (1 - v / max)).toFixed(2);
      d += `${pen ? "L" : "M"}${x} ${y} `;
      pen = true;
      dots.append(s("circle", { cx: x, cy: y, r: 1.6 }, s("title", null, `${key} ${v.toFixed(1)} ms`)));
    });
    if (d) svg.append(s("path", { d, fill: "none", stroke: COLORS[key], "stroke-width": 1.5, "stroke-linejoin": "round", class: key }));
    svg.append(dots);
  }
  const last = [...points].reverse().find((p) => p.p50 !== null);
  svg.dataset.points = String(withData);
  svg.dataset.samples = String(samples);
  svg.dataset.p50 = last ? last.p50.toFixed(1) : "";
  svg.dataset.p95 = last ? last.p95.toFixed(1) : "";
  svg.dataset.peak = peak.toFixed(1);
}

export function chartSvg(attrs) {
  return s("svg", { class: "chart", xmlns: SVG, ...attrs });
}
