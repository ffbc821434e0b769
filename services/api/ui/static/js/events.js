// Events: the system event log (GET /api/events, newest first, a page at a time with
// older pages by cursor; filters type, source, severity) and new events arriving live
// (GET /api/events/stream). Severity colored; data shown as key=value, expandable to JSON.
import { ApiProblem, get, liveFeed, stream } from "./api.js";
import { app, button, fmtDate, fmtTime, h, problemBox } from "./dom.js";

const PAGE = 100;
const KEEP = 500; // rows kept while live
const RANK = { info: 0, warning: 1, error: 2 };
const TYPES = [
  "audit", "config_applied", "config_rejected", "replica_started", "replica_stopped", "replica_gone",
  "intercept_resolved", "intercept_timeout", "flow_replayed", "database_unavailable", "database_recovered",
  "ingest_error", "ingest_decode_error",
];

const params = new URLSearchParams(location.search);
const state = {
  type: params.get("type") ?? "", source: params.get("source") ?? "", severity: params.get("severity") ?? "",
  cursors: [], cursor: null, next: null, seen: new Set(), newer: 0,
};

const root = app();
const typeIn = h("input", { id: "event-type", list: "event-types", value: state.type, placeholder: "any type", "aria-label": "event type", spellcheck: "false" });
const sourceIn = h("input", { id: "event-source", value: state.source, placeholder: "any source", "aria-label": "event source", spellcheck: "false" });
const sevIn = h("select", { id: "event-severity", "aria-label": "at least this severity" },
  h("option", { value: "" }, "any severity"), h("option", { value: "warning" }, "warning and up"), h("option", { value: "error" }, "error"));
sevIn.value = state.severity;
const liveState = h("span", { id: "live-state", class: "badge" }, "…");
const liveToggle = h("button", { type: "button", id: "live-toggle" });
const newerBadge = h("button", { type: "button", id: "newer", class: "badge link", hidden: true, onclick: () => firstPage() });
const message = h("div", { id: "events-message" });
const tbody = h("tbody", { id: "event-rows" });
const older = h("button", { type: "button", id: "older", onclick: () => olderPage() }, "Older →");
const newer = h("button", { type: "button", id: "newer-page", onclick: () => newerPage() }, "← Newer");

root.append(
  h("datalist", { id: "event-types" }, TYPES.map((t) => h("option", { value: t }))),
  h("section", { class: "toolbar" },
    h("form", { class: "events-filter", onsubmit: (e) => { e.preventDefault(); apply(); } },
      typeIn, sourceIn, sevIn, h("button", { type: "submit" }, "Apply"),
      button("Clear", () => { typeIn.value = ""; sourceIn.value = ""; sevIn.value = ""; apply(); }, { cls: "link" })),
    h("div", { class: "row" }, liveState, liveToggle, newerBadge),
  ),
  message,
  h("table", { class: "events" },
    h("thead", null, h("tr", null, ["Time", "Severity", "Type", "Source", "Data"].map((c) => h("th", null, c)))),
    tbody),
  h("div", { class: "pager" }, newer, older),
);
sevIn.addEventListener("change", apply);

function summary(data) {
  const out = [];
  for (const [k, v] of Object.entries(data ?? {})) {
    if (v === null || v === undefined) continue;
    const text = typeof v === "object" ? JSON.stringify(v) : String(v);
    out.push(h("span", { class: "kv-pair" }, h("b", null, k, "="), text.length > 80 ? text.slice(0, 80) + "…" : text));
  }
  return out;
}

function row(ev, fresh = false) {
  const sev = ev.severity ?? "info";
  const dataCell = h("td", { class: "data", title: "click to expand" }, summary(ev.data));
  const tr = h("tr", { class: `sev-${sev}${fresh ? " fresh" : ""}`, dataset: { seq: ev.seq, type: ev.type, severity: sev } },
    h("td", { class: "t", title: fmtDate(ev.time) }, `${new Date(ev.time * 1000).toLocaleDateString(undefined, { month: "2-digit", day: "2-digit" })} ${fmtTime(ev.time)}`),
    h("td", null, h("span", { class: `badge sev-${sev}` }, sev)),
    h("td", null, h("code", null, ev.type), ev.data?.action ? h("div", { class: "muted" }, ev.data.action) : null),
    h("td", { class: "muted" }, ev.source, ev.replica && ev.replica !== ev.source ? h("div", null, `via ${ev.replica}`) : null),
    dataCell,
  );
  dataCell.addEventListener("click", () => {
    const open = tr.classList.toggle("open");
    dataCell.replaceChildren(...(open ? [h("pre", { class: "json" }, JSON.stringify(ev, null, 2))] : summary(ev.data)));
  });
  return tr;
}

function query() {
  return { type: state.type, source: state.source, severity: state.severity };
}

function apply() {
  state.type = typeIn.value.trim();
  state.source = sourceIn.value.trim();
  state.severity = sevIn.value;
  const url = new URL(location.href);
  for (const k of ["type", "source", "severity"]) { if (state[k]) url.searchParams.set(k, state[k]); else url.searchParams.delete(k); }
  history.replaceState(null, "", url);
  state.cursors = []; state.cursor = null;
  load().then(() => feed.restart());
}

async function load() {
  let page;
  try {
    page = await get("/api/events", { ...query(), limit: PAGE, cursor: state.cursor });
  } catch (err) {
    if (err instanceof ApiProblem) { message.replaceChildren(problemBox(err)); return; }
    throw err;
  }
  message.replaceChildren();
  state.next = page.next_cursor;
  state.seen = new Set(page.events.map((e) => e.seq));
  if (state.cursor === null) state.newest = page.events.length ? String(Math.max(...page.events.map((e) => e.seq))) : null;
  state.newer = 0; newerBadge.hidden = true;
  tbody.replaceChildren(...page.events.map((e) => row(e)));
  if (!page.events.length) tbody.append(h("tr", { class: "empty" }, h("td", { colspan: 5, class: "muted" }, "No events.")));
  older.disabled = !state.next;
  newer.disabled = state.cursors.length === 0;
  root.dataset.loaded = String(Date.now());
}

function firstPage() { state.cursors = []; state.cursor = null; load(); }
function olderPage() { if (!state.next) return; state.cursors.push(state.cursor); state.cursor = state.next; load(); }
function newerPage() { if (!state.cursors.length) return; state.cursor = state.cursors.pop(); load(); }

function onEvent(ev) {
  if (ev.seq !== undefined && state.seen.has(ev.seq)) return;
  if (state.severity && (RANK[ev.severity] ?? 0) < RANK[state.severity]) return;
  if (state.cursor !== null) { // reading an older page: count, do not move the rows
    state.newer += 1;
    newerBadge.hidden = false;
    newerBadge.textContent = `${state.newer} new ↑`;
    return;
  }
  if (ev.seq !== undefined) state.seen.add(ev.seq);
  tbody.querySelector("tr.empty")?.remove();
  tbody.prepend(row(ev, true));
  while (tbody.rows.length > KEEP) {
    const last = tbody.rows[tbody.rows.length - 1];
    state.seen.delete(Number(last.dataset.seq));
    last.remove();
  }
}

// from the newest event on the first page: nothing stored meanwhile is missed
const feed = liveFeed(liveState, liveToggle, (onState) =>
  stream("/api/events/stream", {
    type: state.type, source: state.source, last_event_id: state.cursor === null ? state.newest : null,
  }, { onEvent, onState }));

load().then(() => feed.restart());
