// Timing waterfalls as browser devtools draw them. One flow: DNS, connect, TLS, send,
// wait, receive, each a bar on one time axis. A page of flows: each flow a bar placed on
// the page's time span (phases shown when the flow's timings are known).
import { fmtMs, h } from "./dom.js";

export const PHASES = [
  ["dns", "DNS"], ["connect", "Connect"], ["tls", "TLS"], ["send", "Send"], ["wait", "Wait"], ["receive", "Receive"],
];

// Phase durations (ms) from the recorded points (epoch seconds): start, dns, connect,
// tls (upstream connection, only when this flow opened it), request_sent, first_byte,
// end. Missing points collapse their phase to nothing; out-of-order points are clamped.
export function phases(t) {
  const start = t?.start;
  if (!start) return [];
  const end = t.end ?? t.first_byte ?? t.request_sent ?? start;
  const points = [["dns", t.dns], ["connect", t.connect], ["tls", t.tls], ["send", t.request_sent], ["wait", t.first_byte], ["receive", end]];
  const out = [];
  let at = start;
  for (const [name, p] of points) {
    if (p === null || p === undefined) continue;
    const until = Math.min(Math.max(at, p), end);
    out.push({ name, from: (at - start) * 1000, ms: (until - at) * 1000 });
    at = until;
  }
  return out;
}

export function flowWaterfall(flow) {
  const t = flow.timings ?? {};
  const parts = phases(t);
  const total = parts.reduce((n, p) => n + p.ms, 0) || 1;
  return h("table", { class: "waterfall", id: "waterfall" },
    h("tbody", null, PHASES.map(([name, label]) => {
      const p = parts.find((x) => x.name === name);
      return h("tr", { dataset: { phase: name } },
        h("th", null, label),
        h("td", { class: "track" }, p ? h("div", {
          class: `bar ${name}`,
          style: `left:${(p.from / total) * 100}%;width:${Math.max((p.ms / total) * 100, 0.3)}%`,
        }) : null),
        h("td", { class: "num" }, p ? fmtMs(p.ms) : (["dns", "connect", "tls"].includes(name) ? "reused / n/a" : "")),
      );
    }), h("tr", null, h("th", null, "Total"), h("td", null), h("td", { class: "num" }, fmtMs(total)))),
  );
}

// Each row's bar placed on the span of the page (oldest start .. latest end). The bar
// elements are made once per row and only moved here: a live page redraws this often.
export function placeBars(entries) {
  let lo = Infinity;
  let hi = -Infinity;
  const now = Date.now() / 1000;
  for (const { flow: f } of entries) {
    const s = f.started_at ?? f.timings?.start;
    if (!s) continue;
    lo = Math.min(lo, s);
    hi = Math.max(hi, f.ended_at ?? f.timings?.end ?? now);
  }
  const span = hi > lo ? hi - lo : 1;
  for (const entry of entries) {
    const f = entry.flow;
    const s = f.started_at ?? f.timings?.start;
    const cell = entry.tr.lastElementChild;
    if (!s || !cell) continue;
    const ended = f.ended_at ?? f.timings?.end;
    const e = ended ?? now;
    if (!entry.bar) {
      entry.bar = h("div", { class: "wfbar" });
      cell.replaceChildren(h("div", { class: "wftrack" }, entry.bar));
    }
    const bar = entry.bar;
    bar.style.left = `${((s - lo) / span) * 100}%`;
    bar.style.width = `${Math.max(((e - s) / span) * 100, 0.4)}%`;
    if (ended && !entry.phased) { // drawn once, when the flow is over
      entry.phased = true;
      bar.classList.remove("open");
      bar.title = fmtMs((e - s) * 1000);
      const parts = f.timings ? phases(f.timings) : [];
      const total = parts.reduce((n, p) => n + p.ms, 0);
      if (total > 0) {
        for (const p of parts) bar.append(h("i", { class: p.name, style: `width:${(p.ms / total) * 100}%` }));
      }
    } else if (!ended) {
      bar.classList.add("open");
    }
  }
}
