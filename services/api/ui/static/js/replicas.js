// Replicas: the fleet's state from GET /api/proxy/status (polled every 2 s), start/stop for
// all or one replica, and live charts per replica computed in the browser from the flow
// event stream (final events only): flows/s by status class and upstream latency p50/p95.
// From the API and the event stream, not a second metrics system.
import { api, get, stream } from "./api.js";
import { app, button, fmtDate, h, problemBox } from "./dom.js";
import { CLASSES, COLORS, SecondSeries, chartSvg, drawLatency, drawRate } from "./chart.js";

const POLL_MS = 2000;
const WINDOW_S = 180; // the charts show the last 3 minutes
const MAX_SERIES = 64; // replicas with a chart kept (one seen in flows but gone is dropped)

const root = app();
const fleetState = h("span", { id: "fleet-state", class: "badge" }, "…");
const totals = h("span", { id: "fleet-totals", class: "muted" });
const liveState = h("span", { id: "live-state", class: "badge", title: "the flow event stream the charts are computed from" }, "…");
const updated = h("span", { id: "status-updated", class: "muted" });
const message = h("div", { id: "replicas-message" });
const allDeadline = deadlineInput("deadline-all");
const cards = h("div", { id: "replica-cards", class: "cards ops-cards" });
const series = new Map(); // replica id -> SecondSeries
const shown = new Map(); // replica id -> card parts

root.append(
  h("section", { class: "toolbar" },
    h("div", { class: "row" }, h("b", null, "Fleet"), fleetState, totals),
    h("div", { class: "row" },
      button("Start all", () => act("start", null), { admin: true, cls: "primary" }),
      h("label", { class: "muted", for: "deadline-all" }, "drain"), allDeadline, h("span", { class: "muted" }, "s"),
      button("Stop all", () => act("stop", null, allDeadline), { admin: true, cls: "danger" }),
      h("span", { class: "muted" }, "charts:"), liveState, updated,
    ),
  ),
  message,
  legend(),
  cards,
);

function legend() {
  return h("div", { class: "legend ops-legend" },
    CLASSES.map((c) => h("span", null, h("i", { style: `background:${COLORS[c]}` }), c)),
    h("span", null, h("i", { style: `background:${COLORS.p50}` }), "latency p50"),
    h("span", null, h("i", { style: `background:${COLORS.p95}` }), "p95"),
    h("span", null, `· one point per second, last ${WINDOW_S / 60} minutes; latency = first byte − request sent`),
  );
}

function deadlineInput(id) {
  return h("input", {
    id, type: "number", min: "0", max: "3600", step: "any", value: "10", class: "deadline",
    title: "seconds in-flight requests may finish before they are cut", "aria-label": "drain deadline in seconds",
  });
}

function fmtUptime(s) {
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

const COUNTERS = [
  ["active_connections", "connections"], ["active_flows", "active flows"], ["flows_total", "flows total"],
  ["intercepts_pending", "intercepts held"], ["events_dropped", "events dropped"],
  ["config_revision", "config revision"], ["policy_revision", "policy revision"],
];

function card(r) {
  const deadline = deadlineInput(`deadline-${r.id}`);
  const parts = {
    state: h("span", { class: "badge state" }),
    listen: h("code", { class: "listen" }),
    meta: h("span", { class: "muted meta" }),
    counters: h("dl", { class: "counters" }),
    problems: h("div", { class: "replica-problems" }),
    rate: chartSvg({ class: "chart rate", "data-replica": r.id }),
    latency: chartSvg({ class: "chart latency", "data-replica": r.id }),
    rateNote: h("span", { class: "muted rate-note" }),
    latNote: h("span", { class: "muted lat-note" }),
  };
  parts.el = h("article", { class: "panel replica", dataset: { replica: r.id } },
    h("header", { class: "replica-head" },
      h("h2", null, r.id), parts.state, parts.listen, parts.meta),
    h("div", { class: "row actions" },
      button("Start", () => act("start", r.id), { admin: true }),
      h("label", { class: "muted", for: `deadline-${r.id}` }, "drain"), deadline, h("span", { class: "muted" }, "s"),
      button("Stop", () => act("stop", r.id, deadline), { admin: true, cls: "danger" }),
    ),
    parts.counters,
    parts.problems,
    h("div", { class: "chart-title" }, h("b", null, "Flows/s"), " ", parts.rateNote),
    parts.rate,
    h("div", { class: "chart-title" }, h("b", null, "Upstream latency"), " ", parts.latNote),
    parts.latency,
  );
  return parts;
}

function update(parts, r) {
  parts.el.dataset.state = r.state;
  parts.state.textContent = r.state;
  parts.state.dataset.state = r.state === "running" ? "live" : "closed";
  parts.listen.textContent = r.listen;
  parts.meta.textContent = `${r.mode} · up ${fmtUptime(r.uptime_s)} · v${r.version}`;
  parts.meta.title = `last heartbeat ${fmtDate(r.updated_at)}`;
  parts.counters.replaceChildren(...COUNTERS.flatMap(([k, label]) => [
    h("dt", null, label), h("dd", { dataset: { counter: k } }, String(r[k] ?? 0)),
  ]));
  parts.problems.replaceChildren(...[
    r.config_error ? h("div", { class: "problem config-error" }, h("b", null, "config: "), r.config_error) : null,
    r.policy_error ? h("div", { class: "problem policy-error" }, h("b", null, "policy: "), r.policy_error) : null,
  ].filter(Boolean));
}

async function poll() {
  try {
    const st = await get("/api/proxy/status");
    fleetState.textContent = st.state;
    fleetState.dataset.state = st.state === "running" ? "live" : "closed";
    root.dataset.state = st.state;
    const t = st.totals;
    totals.textContent = `${t.running}/${t.replicas} running · ${t.active_connections} connections · ${t.active_flows} active flows · ${t.flows_total} flows`;
    const ids = new Set();
    for (const r of st.replicas) {
      ids.add(r.id);
      let parts = shown.get(r.id);
      if (!parts) { parts = card(r); shown.set(r.id, parts); }
      update(parts, r);
    }
    for (const [id, parts] of shown) if (!ids.has(id)) { parts.el.remove(); shown.delete(id); }
    const order = st.replicas.map((r) => shown.get(r.id).el);
    if (order.some((el, i) => cards.children[i] !== el) || cards.children.length !== order.length) cards.replaceChildren(...order);
    if (!st.replicas.length) cards.replaceChildren(h("p", { class: "muted" }, "No replica is registered."));
    updated.textContent = `status ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
    updated.removeAttribute("data-error");
  } catch (err) {
    updated.textContent = `status failed: ${err.message}`;
    updated.dataset.error = "true";
  }
  drawCharts();
}

async function act(verb, replica, deadlineEl) {
  const body = {};
  if (replica) body.replica = replica;
  if (verb === "stop" && deadlineEl) {
    const d = Number(deadlineEl.value);
    if (deadlineEl.value !== "" && Number.isFinite(d)) body.deadline = d;
  }
  message.replaceChildren(h("p", { class: "muted" }, `${verb} ${replica ?? "all"}…`));
  try {
    const res = await api("POST", `/api/proxy/${verb}`, { body });
    message.replaceChildren(h("div", { class: res.ok ? "ok" : "problem", id: "action-result", role: "status" },
      `${verb} ${replica ?? "all"}: ${res.ok ? "done" : "not everywhere"}`,
      h("ul", null, res.replicas.map((o) => h("li", null,
        h("code", null, o.id), ` ${o.ok ? "ok" : "failed"} · ${o.state ?? "?"}`,
        o.aborted ? ` · ${o.aborted} in-flight cut` : "",
        o.code ? [" · ", h("code", null, o.code)] : "", o.message ? ` ${o.message}` : ""))),
    ));
  } catch (err) {
    message.replaceChildren(problemBox(err));
  }
  poll();
}

function seriesOf(id) {
  let s = series.get(id);
  if (!s) {
    if (series.size >= MAX_SERIES) { // forget the replica quiet for longest
      let oldest = null;
      for (const [k, v] of series) if (!shown.has(k) && (!oldest || v.lastAt < series.get(oldest).lastAt)) oldest = k;
      series.delete(oldest ?? series.keys().next().value);
    }
    s = new SecondSeries(WINDOW_S);
    series.set(id, s);
  }
  return s;
}

function onFlow(ev) {
  if (ev.event === "started" || !ev.replica) return; // final events only
  seriesOf(ev.replica).add(ev);
}

function drawCharts() {
  const now = Date.now();
  for (const [id, parts] of shown) {
    const s = series.get(id);
    const pts = (s ?? new SecondSeries(WINDOW_S)).points(now);
    const t = drawRate(parts.rate, pts);
    drawLatency(parts.latency, pts);
    const n = CLASSES.reduce((a, c) => a + t[c], 0);
    parts.rateNote.textContent = `${n} flows in ${WINDOW_S / 60} min · ` + CLASSES.filter((c) => t[c]).map((c) => `${c} ${t[c]}`).join(" · ");
    const lat = parts.latency.dataset;
    parts.latNote.textContent = lat.p50 ? `last p50 ${lat.p50} ms · p95 ${lat.p95} ms · ${lat.samples} samples` : "no samples yet";
  }
}

stream("/api/flows/stream", {}, {
  onEvent: onFlow,
  onState: (st) => { liveState.textContent = st; liveState.dataset.state = st; },
});
poll();
setInterval(poll, POLL_MS);
setInterval(drawCharts, 1000);
