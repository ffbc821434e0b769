// Config: the runtime config document in a JSON editor, saved with PUT and If-Match (a
// stale revision is said and a reload offered; a 422 names each field next to the editor,
// nothing is written), the roll-out of a write, the history (who wrote each revision, from
// the audit log), a field-by-field diff of two revisions, rollback, and the saved document
// against what each replica runs.
import { ApiProblem, CAN_ACT, api, get } from "./api.js";
import { app, button, fmtDate, h, problemBox } from "./dom.js";

const root = app();
const state = { revision: null, saved: null, history: [], who: new Map() };

const revBadge = h("span", { id: "config-revision", class: "badge" }, "…");
const editor = h("textarea", {
  id: "config-editor", spellcheck: "false", autocomplete: "off", rows: "24",
  "aria-label": "the runtime config document (JSON)", "aria-describedby": "config-errors",
});
const message = h("div", { id: "config-message" });
if (!CAN_ACT) {
  editor.readOnly = true;
  message.append(h("p", { class: "muted", id: "read-only" }, "Read only: saving and rolling back need an admin key."));
}
const errors = h("div", { id: "config-errors", "aria-live": "polite" });
const fields = h("ul", { id: "config-fields" });
const rollout = h("div", { id: "rollout", class: "rollout" });
const compareBox = h("div", { id: "compare" });
const historyBody = h("tbody", { id: "history-rows" });
const diffFrom = h("select", { id: "diff-from", "aria-label": "older revision", onchange: () => drawDiff() });
const diffTo = h("select", { id: "diff-to", "aria-label": "newer revision", onchange: () => drawDiff() });
const diffOut = h("div", { id: "diff" });

root.append(
  h("section", { class: "toolbar" },
    h("div", { class: "row" }, h("b", null, "Runtime config"), revBadge,
      h("span", { class: "muted" }, "hot-reloaded by every replica; PUT replaces the whole document")),
    h("div", { class: "row" }, button("Reload", () => load(true), { title: "discard edits and read the saved config" })),
  ),
  message,
  h("div", { class: "config-grid" },
    h("div", null,
      editor,
      h("div", { class: "config-bar" },
        button("Save", save, { admin: true, cls: "primary", title: "PUT /api/config with If-Match" }),
        button("Format", format, { title: "re-indent the JSON" }),
        button("Revert edits", () => setEditor(state.saved), {}),
        h("span", { id: "editor-state", class: "muted" }),
      ),
      rollout,
    ),
    h("div", { class: "config-fields panel" },
      h("h2", null, "Fields"),
      errors,
      fields,
    ),
  ),
  h("h2", null, "Replicas: saved vs running"),
  compareBox,
  h("h2", null, "History"),
  h("div", { class: "panel" },
    h("table", { class: "compact history" },
      h("thead", null, h("tr", null, ["Revision", "Time", "Who", "Operation", "Changed", ""].map((c) => h("th", null, c)))),
      historyBody),
    h("h2", null, "Diff between revisions"),
    h("div", { class: "diff-bar" }, "from", diffFrom, "to", diffTo),
    diffOut,
  ),
);

const pretty = (doc) => JSON.stringify(doc, null, 2);
const short = (v) => (v === undefined ? "—" : JSON.stringify(v));

function setEditor(doc) {
  editor.value = pretty(doc);
  showErrors([]);
  drawFields();
}

function format() {
  try { editor.value = pretty(JSON.parse(editor.value)); showErrors([]); } catch (e) { showErrors([{ field: "", message: `not JSON: ${e.message}` }]); }
}

// The document in the editor, parsed (null when it is not JSON).
function edited() {
  try { return JSON.parse(editor.value); } catch { return null; }
}

// The top-level field an error names: "body.capture_body_limit" / "body.config.x.0" -> "x".
function fieldOf(name) {
  const parts = String(name ?? "").split(".");
  if (parts[0] === "body") parts.shift();
  if (parts[0] === "config" && !(state.saved && "config" in state.saved)) parts.shift();
  return { top: parts[0] ?? "", path: parts.join(".") };
}

// Each field of the document, its value, and its errors next to it.
function drawFields(errs = []) {
  const doc = edited() ?? {};
  const byField = new Map();
  for (const e of errs) {
    const { top } = fieldOf(e.field);
    if (!byField.has(top)) byField.set(top, []);
    byField.get(top).push(e);
  }
  const names = [...new Set([...Object.keys(state.saved ?? {}), ...Object.keys(doc), ...byField.keys()])].filter(Boolean);
  fields.replaceChildren(...names.map((name) => {
    const mine = byField.get(name) ?? [];
    const changed = state.saved && JSON.stringify(state.saved[name]) !== JSON.stringify(doc[name]);
    return h("li", { dataset: { field: name }, class: mine.length ? "invalid" : null },
      h("code", null, name), changed ? h("span", { class: "tag", title: "edited, not saved" }, "edited") : null,
      h("span", { class: "value" }, name in doc ? short(doc[name]) : "(default)"),
      mine.map((e) => h("div", { class: "field-error", role: "alert" },
        fieldOf(e.field).path !== name ? h("code", null, fieldOf(e.field).path, ": ") : null, e.message)));
  }));
}

function showErrors(errs, problem) {
  errors.replaceChildren();
  if (!errs.length && !problem) { editor.removeAttribute("aria-invalid"); drawFields(); return; }
  editor.setAttribute("aria-invalid", "true");
  errors.append(h("div", { class: "problem" },
    h("b", null, problem?.message ?? "The document is not valid; nothing was saved."),
    problem?.code ? [" ", h("code", null, problem.code)] : null,
    errs.length ? h("ul", null, errs.map((e) => h("li", null, h("code", null, fieldOf(e.field).path || "document"), ": ", e.message))) : null,
  ));
  drawFields(errs);
  const first = errs.map((e) => fieldOf(e.field).top).find(Boolean);
  if (first) selectField(first);
}

// Select the field's line in the editor so it is where the cursor is.
function selectField(name) {
  const at = editor.value.indexOf(`"${name}"`);
  if (at < 0) return;
  const end = editor.value.indexOf("\n", at);
  editor.setSelectionRange(at, end < 0 ? editor.value.length : end);
}

editor.addEventListener("input", () => {
  const ok = edited() !== null;
  document.getElementById("editor-state").textContent = ok ? "" : "not valid JSON yet";
  if (ok) drawFields();
});

async function load(discard = false) {
  const cur = await get("/api/config");
  state.revision = cur.revision;
  const dirty = state.saved && editor.value !== pretty(state.saved);
  state.saved = cur.config;
  revBadge.textContent = `revision ${cur.revision}`;
  revBadge.dataset.revision = String(cur.revision);
  if (discard || !dirty) setEditor(cur.config);
  if (discard) message.replaceChildren();
  await Promise.all([loadHistory(), loadCompare()]);
}

async function save() {
  const doc = edited();
  rollout.replaceChildren();
  if (doc === null) {
    try { JSON.parse(editor.value); } catch (e) { showErrors([{ field: "", message: `not JSON: ${e.message}` }]); }
    return;
  }
  message.replaceChildren();
  try {
    const res = await api("PUT", "/api/config", { body: doc, headers: { "If-Match": `"${state.revision}"` } });
    showErrors([]);
    showRollout(res, "Saved");
    await load(true);
setInterval(() => { if (!document.hidden) loadCompare(); }, 5000); // pending replicas catch up
    message.replaceChildren(h("div", { class: "ok", role: "status", id: "saved" }, `Saved as revision ${res.revision}.`));
  } catch (err) {
    if (!(err instanceof ApiProblem)) throw err;
    if (err.status === 412) {
      message.replaceChildren(h("div", { class: "problem", role: "alert", id: "stale" },
        h("b", null, "Someone saved the config since you loaded it. "), err.message, " ",
        button("Reload (discards your edits)", () => load(true), {}),
        " or copy your edits first."));
    } else if (err.status === 422) {
      showErrors(err.errors, err);
    } else {
      message.replaceChildren(problemBox(err));
    }
  }
}

function showRollout(res, what) {
  const rej = res.rejected ?? [];
  rollout.replaceChildren(h("div", { class: "panel" },
    h("b", null, `${what}: revision ${res.revision} roll-out`),
    h("ul", null,
      h("li", { class: "applied" }, `applied (${res.applied.length}): `, res.applied.join(", ") || "none"),
      h("li", { class: "pending" }, `pending (${res.pending.length}): `, res.pending.join(", ") || "none",
        res.pending.length ? h("span", { class: "muted" }, " (not reported yet; see the comparison below)") : null),
      h("li", { class: "rejected" }, `rejected (${rej.length}): `, rej.length ? rej.map((r) => [h("code", null, r.id), ` ${r.error} `]) : "none"),
    )));
  rollout.dataset.applied = String(res.applied.length);
  rollout.dataset.rejected = String(rej.length);
}

// Who wrote each revision: the audit events of config writes (after -> key id).
async function loadWho() {
  try {
    const page = await get("/api/events", { type: "audit", limit: 500 });
    for (const ev of page.events) {
      const d = ev.data ?? {};
      if (String(d.action ?? "").startsWith("config.") && d.after) state.who.set(d.after, { key: d.key_id, action: d.action, to: d.to });
    }
  } catch { /* the history is still useful without it */ }
}

async function loadHistory() {
  const [hist] = await Promise.all([get("/api/config/history"), loadWho()]);
  state.history = hist.revisions;
  const prev = new Map();
  const revs = [...hist.revisions].sort((a, b) => a.revision - b.revision);
  revs.forEach((r, i) => prev.set(r.revision, i > 0 ? revs[i - 1] : null));
  historyBody.replaceChildren(...hist.revisions.map((r) => {
    const who = state.who.get(r.revision);
    const before = prev.get(r.revision);
    const changed = r.config && before?.config ? diffFields(before.config, r.config).map((d) => d.field) : [];
    const current = r.revision === state.revision;
    return h("tr", { dataset: { revision: r.revision }, class: current ? "current" : null },
      h("td", null, String(r.revision), current ? h("span", { class: "tag" }, " current") : null),
      h("td", null, r.time ? fmtDate(Date.parse(r.time) / 1000) : ""),
      h("td", { class: "who" }, who ? [h("code", null, who.key), " ", h("span", { class: "muted" }, who.action + (who.to ? ` to ${who.to}` : ""))] : h("span", { class: "muted" }, "—")),
      h("td", null, r.operation),
      h("td", { class: "muted" }, changed.join(", ")),
      h("td", null,
        button("Diff", () => { diffFrom.value = String(before?.revision ?? r.revision); diffTo.value = String(r.revision); drawDiff(); }, { cls: "link" }),
        r.config && !current ? button("Roll back to this", () => rollback(r.revision), { admin: true, cls: "link" }) : null),
    );
  }));
  const opts = (sel) => {
    const keep = sel.value;
    sel.replaceChildren(...hist.revisions.filter((r) => r.config).map((r) => h("option", { value: r.revision }, `revision ${r.revision}`)));
    if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  };
  opts(diffFrom); opts(diffTo);
  if (!diffFrom.dataset.touched && diffFrom.options.length > 1) { diffTo.selectedIndex = 0; diffFrom.selectedIndex = 1; }
  drawDiff();
}

async function rollback(revision) {
  message.replaceChildren(h("p", { class: "muted" }, `rolling back to revision ${revision}…`));
  try {
    const res = await api("POST", "/api/config/rollback", { body: { revision } });
    showRollout(res, `Rolled back to revision ${revision}`);
    await load(true);
setInterval(() => { if (!document.hidden) loadCompare(); }, 5000); // pending replicas catch up
    message.replaceChildren(h("div", { class: "ok", role: "status", id: "saved" }, `Revision ${revision}'s document is now revision ${res.revision}.`));
  } catch (err) {
    message.replaceChildren(problemBox(err));
  }
}

// Field by field: every key of either document whose value differs.
function diffFields(a, b) {
  const out = [];
  for (const k of [...new Set([...Object.keys(a ?? {}), ...Object.keys(b ?? {})])]) {
    if (JSON.stringify(a?.[k]) !== JSON.stringify(b?.[k])) out.push({ field: k, before: a?.[k], after: b?.[k] });
  }
  return out;
}

function diffTable(rows, left, right) {
  return h("table", { class: "compact diff" },
    h("thead", null, h("tr", null, h("th", null, "Field"), h("th", null, left), h("th", null, right))),
    h("tbody", null, rows.map((d) => h("tr", { dataset: { field: d.field } },
      h("td", null, h("code", null, d.field)), h("td", { class: "old" }, short(d.before)), h("td", { class: "new" }, short(d.after))))));
}

function drawDiff() {
  const find = (v) => state.history.find((r) => String(r.revision) === v);
  const a = find(diffFrom.value), b = find(diffTo.value);
  if (!a || !b) { diffOut.replaceChildren(h("p", { class: "muted" }, "Two revisions with a document are needed.")); return; }
  const rows = diffFields(a.config, b.config);
  diffOut.dataset.count = String(rows.length);
  diffOut.replaceChildren(rows.length ? diffTable(rows, `revision ${a.revision}`, `revision ${b.revision}`)
    : h("p", { class: "muted" }, `Revisions ${a.revision} and ${b.revision} hold the same document.`));
}
diffFrom.addEventListener("change", () => { diffFrom.dataset.touched = "1"; });

async function loadCompare() {
  try {
    const cmp = await get("/api/config/compare");
    compareBox.dataset.inSync = String(cmp.in_sync);
    compareBox.replaceChildren(h("div", { class: "panel" },
      h("p", null, h("span", { id: "in-sync", class: `badge ${cmp.in_sync ? "yes" : "no"}` }, cmp.in_sync ? "in sync" : "not in sync"),
        h("span", { class: "muted" }, ` saved revision ${cmp.revision} · ${cmp.replicas.length} replica(s)`)),
      h("table", { class: "compact" },
        h("thead", null, h("tr", null, ["Replica", "Runs revision", "State", "Differences (saved vs running)"].map((c) => h("th", null, c)))),
        h("tbody", { id: "compare-rows" }, cmp.replicas.map((r) => h("tr", { dataset: { replica: r.id, state: r.state } },
          h("td", null, h("code", null, r.id)),
          h("td", null, String(r.revision)),
          h("td", null, h("span", { class: `badge ${r.state === "applied" ? "yes" : "no"}` }, r.state), r.error ? h("div", { class: "field-error" }, r.error) : null),
          h("td", null, r.differences === null ? h("span", { class: "muted" }, "running document unknown (left the kept history)")
            : r.differences.length ? diffTable(r.differences.map((d) => ({ field: d.field, before: d.saved, after: d.running })), "saved", "running")
              : h("span", { class: "muted" }, "none")),
        )))),
      button("Refresh", loadCompare, { cls: "link" }),
    ));
  } catch (err) {
    compareBox.replaceChildren(problemBox(err));
  }
}

load(true);
setInterval(() => { if (!document.hidden) loadCompare(); }, 5000); // pending replicas catch up
