// Flows: one page at a time from the store (never the whole store in the browser), the
// filter bar (the filter language, its help, the error shown where it is), new flows
// arriving live over SSE, and a waterfall of the page's flows as devtools draw it.
import { ApiProblem, get, liveFeed, stream } from "./api.js";
import { app, fmtBytes, fmtMs, fmtTime, h, problemBox, statusClass } from "./dom.js";
import { placeBars } from "./waterfall.js";

const PAGE = 100;
const KEEP = 300; // rows kept while live: older ones fall off the bottom (page to them)

const params = new URLSearchParams(location.search);
const state = {
  q: params.get("q") ?? "",
  cursors: [], // cursors of the pages before this one ("newer")
  cursor: null,
  next: null,
  live: params.get("live") !== "0", // ?live=0: open paused
  rows: new Map(), // flow id -> { tr, flow }
  pending: [],
  newer: 0, // live flows seen while reading an older page
  seen: 0, // live events received, and of them final ones (the UI benchmark reads both)
  finals: 0,
};

const root = app();
const input = h("input", {
  id: "filter", type: "search", value: state.q, spellcheck: "false", autocomplete: "off",
  placeholder: "filter: ~d example.com & ~c 500   (press Enter; ? for help)",
  "aria-label": "filter expression",
});
const filterError = h("div", { id: "filter-error", class: "filter-error", hidden: true });
const help = h("div", { id: "filter-help", class: "filter-help", hidden: true });
const count = h("span", { id: "flow-count", class: "muted" });
const liveState = h("span", { id: "live-state", class: "badge" }, "…");
const liveToggle = h("button", { type: "button", id: "live-toggle" });
const newerBadge = h("button", { type: "button", id: "newer", class: "badge link", hidden: true, onclick: () => firstPage() });
const tbody = h("tbody", { id: "flow-rows" });
const older = h("button", { type: "button", id: "older", onclick: () => olderPage() }, "Older →");
const newer = h("button", { type: "button", id: "newer-page", onclick: () => newerPage() }, "← Newer");
const harLink = h("a", { id: "har-link", class: "button", download: "flows.har" }, "Download HAR");

root.append(
  h("section", { class: "toolbar" },
    h("form", { class: "filterbar", onsubmit: (e) => { e.preventDefault(); apply(input.value); } },
      input,
      h("button", { type: "submit" }, "Apply"),
      h("button", { type: "button", id: "help-toggle", onclick: toggleHelp, title: "the filter language" }, "?"),
    ),
    h("div", { class: "row" }, count, liveState, liveToggle, newerBadge, harLink),
  ),
  filterError,
  help,
  h("table", { class: "flows" },
    h("thead", null, h("tr", null,
      ["Time", "Method", "Status", "Host", "Path", "Size", "Duration", "Replica", "Waterfall"]
        .map((c) => h("th", { class: c === "Waterfall" ? "wf" : null }, c)))),
    tbody),
  h("div", { class: "pager" }, newer, older),
);

input.addEventListener("keydown", (e) => {
  if (e.key === "?" && input.value === "") { e.preventDefault(); toggleHelp(); }
});

async function toggleHelp() {
  help.hidden = !help.hidden;
  if (help.hidden || help.childElementCount) return;
  const doc = await get("/api/filter-help");
  help.append(
    h("table", { class: "kv" }, h("tbody", null, (doc.operators ?? []).map((op) =>
      h("tr", null, h("td", null, h("code", null, op.operator ?? op.name ?? "")), h("td", null, op.help ?? op.description ?? ""))))),
    doc.examples?.length ? h("p", null, "Examples: ", doc.examples.map((ex) => [
      h("a", { href: "#", class: "example", onclick: (e) => { e.preventDefault(); input.value = ex.q ?? ex; apply(input.value); } },
        h("code", null, ex.q ?? ex)), " "])) : null,
  );
}

function showFilterError(err) {
  filterError.replaceChildren();
  if (!err) { filterError.hidden = true; input.removeAttribute("aria-invalid"); return; }
  const field = err.errors?.find((e) => e.position !== undefined && e.position !== null);
  filterError.hidden = false;
  input.setAttribute("aria-invalid", "true");
  if (field) {
    const pos = Math.min(field.position, state.q.length);
    filterError.append(
      h("pre", { class: "caret" },
        state.q.slice(0, pos), h("mark", null, state.q.slice(pos, pos + 1) || " "), state.q.slice(pos + 1), "\n",
        " ".repeat(pos) + "^ " + field.message + (field.expected ? ` (expected ${field.expected})` : "")),
    );
    input.focus();
    input.setSelectionRange(pos, pos + 1);
  } else {
    filterError.append(problemBox(err));
  }
}

function apply(q) {
  state.q = q.trim();
  state.cursors = [];
  state.cursor = null;
  const url = new URL(location.href);
  if (state.q) url.searchParams.set("q", state.q); else url.searchParams.delete("q");
  history.replaceState(null, "", url);
  // a filter that does not parse keeps the last good page and its live feed
  load().then((ok) => { if (ok !== false) feed.restart(); });
}

async function load() {
  const started = performance.now();
  let page;
  try {
    page = await get("/api/flows", { q: state.q, limit: PAGE, cursor: state.cursor });
  } catch (err) {
    if (err instanceof ApiProblem && err.status === 422) { showFilterError(err); return false; }
    throw err;
  }
  showFilterError(null);
  state.liveQ = state.q; // the filter the live feed follows: the last one that parsed
  state.next = page.next_cursor;
  state.rows.clear();
  tbody.replaceChildren(...page.flows.map((f) => row(f).tr));
  const n = page.filtered_count;
  count.textContent = n === undefined ? "" :
    `${page.filtered_count_exact === false ? "at least " : ""}${n.toLocaleString()} flows` + (page.partial ? " (partial scan)" : "");
  older.disabled = !state.next;
  newer.disabled = state.cursors.length === 0;
  harLink.href = "/api/flows/har" + (state.q ? `?q=${encodeURIComponent(state.q)}` : "");
  drawWaterfall();
  root.dataset.loadedMs = String(Math.round(performance.now() - started));
  root.dataset.loaded = String(Date.now());
}

function firstPage() { state.cursors = []; state.cursor = null; state.newer = 0; newerBadge.hidden = true; load(); }
function olderPage() { if (!state.next) return; state.cursors.push(state.cursor); state.cursor = state.next; load(); }
function newerPage() { if (!state.cursors.length) return; state.cursor = state.cursors.pop(); load(); }

function values(f) {
  const status = f.status ?? f.response?.status ?? (f.state === "active" ? "…" : f.state);
  const started = f.started_at ?? f.timings?.start;
  const ended = f.ended_at ?? f.timings?.end;
  const size = f.response_size ?? f.response?.size;
  const dur = f.duration_ms ?? (started && ended ? (ended - started) * 1000 : null);
  return { status: String(status ?? ""), size: fmtBytes(size), dur: fmtMs(dur) };
}

function row(f) {
  const v = values(f);
  const st = h("td", { class: "st" }, v.status);
  const size = h("td", { class: "num" }, v.size);
  const dur = h("td", { class: "num" }, v.dur);
  const tr = h("tr", { dataset: { id: f.id }, class: statusClass(f) },
    h("td", { class: "t" }, fmtTime(f.started_at ?? f.timings?.start)),
    h("td", null, f.method),
    st,
    h("td", { class: "host", title: f.host }, f.host),
    h("td", { class: "path", title: f.path }, h("a", { href: `/ui/flows/${encodeURIComponent(f.id)}` }, f.path || "/")),
    size,
    dur,
    h("td", { class: "muted" }, f.replica ?? ""),
    h("td", { class: "wf" }),
  );
  const entry = { tr, flow: f, st, size, dur, bar: null, phased: false };
  state.rows.set(f.id, entry);
  return entry;
}

// A live update of a row already drawn: only the cells that change.
function update(entry, f) {
  entry.flow = f;
  const v = values(f);
  entry.tr.className = statusClass(f);
  if (entry.st.textContent !== v.status) entry.st.textContent = v.status;
  if (entry.size.textContent !== v.size) entry.size.textContent = v.size;
  if (entry.dur.textContent !== v.dur) entry.dur.textContent = v.dur;
}

function onEvent(ev) {
  state.pending.push(ev);
  if (state.pending.length === 1) requestAnimationFrame(flush);
}

// Live events are applied once per frame, as one batch (hundreds a second stay cheap).
function flush() {
  const batch = state.pending;
  state.pending = [];
  state.seen += batch.length;
  state.finals += batch.filter((e) => e.event !== "started").length;
  root.dataset.seen = String(state.seen);
  root.dataset.finals = String(state.finals);
  if (state.cursor !== null) { // reading an older page: count, do not move the rows
    state.newer += batch.filter((e) => e.event === "started" || !state.rows.has(e.id)).length;
    newerBadge.hidden = state.newer === 0;
    newerBadge.textContent = `${state.newer} new ↑`;
    return;
  }
  const fresh = document.createDocumentFragment();
  const added = [];
  for (const ev of batch) {
    const known = state.rows.get(ev.id);
    if (known) {
      update(known, { ...known.flow, ...summaryOf(ev) });
    } else {
      added.push(row(summaryOf(ev)).tr);
    }
  }
  for (let i = added.length - 1; i >= 0; i--) fresh.append(added[i]);
  tbody.prepend(fresh);
  while (tbody.rows.length > KEEP) {
    const last = tbody.rows[tbody.rows.length - 1];
    state.rows.delete(last.dataset.id);
    last.remove();
  }
  drawWaterfall();
}

// A flow event (SSE) in the listing's shape.
function summaryOf(ev) {
  const t = ev.timings ?? {};
  return {
    id: ev.id, replica: ev.replica, state: ev.event === "started" ? "active" : (ev.event === "completed" ? "completed" : ev.event),
    method: ev.method, host: ev.host, path: ev.path, scheme: ev.scheme,
    status: ev.response?.status ?? null, started_at: t.start, ended_at: t.end ?? null,
    duration_ms: t.start && t.end ? (t.end - t.start) * 1000 : null,
    response_size: ev.response?.size ?? null, timings: t,
  };
}

let wfScheduled = false;
function drawWaterfall() {
  if (wfScheduled) return;
  wfScheduled = true;
  setTimeout(() => {
    wfScheduled = false;
    placeBars([...state.rows.values()]);
  }, 250);
}

// the live feed follows the last filter that parsed (a bad one keeps the old feed)
const feed = liveFeed(liveState, liveToggle, (onState) =>
  stream("/api/flows/stream", { q: state.liveQ ?? "" }, { onEvent, onState }),
  { live: state.live });

load().then((ok) => { if (ok !== false) feed.restart(); });
