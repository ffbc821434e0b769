// Rules: the policy's rules in document order, an enable/disable toggle per rule, add and
// edit in a form (the common fields, the action as JSON) or as one JSON document, delete,
// and the policy's revision and history. A refused write shows its errors next to the
// field they name (a filter's with a caret at its position); nothing is saved then.
import { ApiProblem, CAN_ACT, api, get } from "./api.js";
import { app, button, confirmButton, fmtDate, h, problemBox } from "./dom.js";

const root = app();
const enc = encodeURIComponent;
const state = { revision: null, rules: [], editing: null /* null | {id|null} */ };

const ACTIONS = {
  block: { type: "block", status: 403, body: "blocked", close: false },
  respond: { type: "respond", status: 200, headers: [["Content-Type", "text/plain"]], body: "mocked" },
  allow: { type: "allow" },
  intercept: { type: "intercept", timeout_s: 60, on_timeout: "deny" },
  map_remote: { type: "map_remote", pattern: "^https?://old\\.example/", replacement: "https://new.example/" },
  set_headers: { type: "set_headers", headers: [["X-Debug", "1"]] },
  remove_headers: { type: "remove_headers", names: ["Cookie"] },
  replace_body: { type: "replace_body", pattern: "foo", replacement: "bar" },
  delay: { type: "delay", ms: 500 },
  tag: { type: "tag", tags: ["tagged"] },
};
const TEMPLATE = { id: "", enabled: true, priority: 0, description: "", match: { filter: "~d example.com", phase: "request" }, action: ACTIONS.block };

const revision = h("span", { id: "policy-revision", class: "badge" }, "…");
const notice = h("div", { id: "notice", "aria-live": "polite" });
const tbody = h("tbody", { id: "rule-rows" });
const empty = h("p", { id: "rules-empty", class: "muted", hidden: true }, "No rules: every exchange passes as it came.");
const editorBox = h("section", { id: "rule-editor", class: "panel rule-editor", hidden: true });
const historyBox = h("section", { id: "policy-history", class: "panel", hidden: true });
const addButton = button("Add rule", () => openEditor(null), { admin: true, cls: "primary" });
addButton.id = "add-rule";

root.append(
  h("section", { class: "toolbar" },
    h("div", { class: "row" }, h("h1", { class: "view-title" }, "Rules"), revision,
      h("button", { type: "button", class: "link", id: "history-toggle", onclick: () => toggleHistory() }, "history")),
    h("div", { class: "row" }, button("Refresh", () => load()), addButton),
  ),
  notice,
  editorBox,
  historyBox,
  h("table", { id: "rules", class: "rules-table" },
    h("thead", null, h("tr", null, ["#", "On", "ID", "Phase", "Prio", "Filter", "Action", "Description", ""]
      .map((c) => h("th", null, c)))),
    tbody),
  empty,
);

// -- the list ----------------------------------------------------------------------------
function pairs(list) { return (list ?? []).map(([k, v]) => `${k}: ${v}`).join(", "); }

export function actionSummary(a) {
  switch (a?.type) {
    case "block": return `block ${a.status ?? 403}${a.close ? " (close)" : ""}`;
    case "respond": return `respond ${a.status ?? 200}${a.headers?.length ? ` + ${a.headers.length} headers` : ""}`;
    case "allow": return "allow";
    case "intercept": return `intercept ${a.timeout_s ?? 60}s, then ${a.on_timeout ?? "deny"}`;
    case "map_remote": return `map_remote ${a.pattern} → ${a.replacement}`;
    case "set_headers": return `set ${pairs(a.headers)}`;
    case "remove_headers": return `remove ${(a.names ?? []).join(", ")}`;
    case "replace_body": return `replace_body ${a.pattern} → ${a.replacement}`;
    case "delay": return `delay ${a.ms} ms`;
    case "tag": return `tag ${(a.tags ?? []).join(", ")}`;
    default: return a?.type ?? "?";
  }
}

function row(rule, i) {
  const on = rule.enabled !== false;
  const toggle = button(on ? "on" : "off", () => setEnabled(rule, !on), {
    admin: true, cls: `toggle ${on ? "is-on" : "is-off"}`, title: on ? "enabled: click to disable" : "disabled: click to enable",
  });
  toggle.setAttribute("aria-pressed", String(on));
  toggle.setAttribute("aria-label", `${on ? "disable" : "enable"} ${rule.id}`);
  const del = confirmButton("Delete", "Really delete?", () => remove(rule), { cls: "small" });
  return h("tr", { dataset: { id: rule.id, enabled: String(on) }, class: on ? null : "disabled" },
    h("td", { class: "num muted" }, String(i + 1)),
    h("td", { class: "on" }, toggle),
    h("td", { class: "id" }, h("code", null, rule.id)),
    h("td", { class: "phase" }, h("span", { class: `phase-tag phase-tag-${rule.match?.phase ?? "request"}` }, rule.match?.phase ?? "request")),
    h("td", { class: "num prio" }, String(rule.priority ?? 0)),
    h("td", { class: "filter" }, h("code", null, rule.match?.filter ?? "")),
    h("td", { class: "action" }, h("span", { class: `act act-${rule.action?.type}` }, actionSummary(rule.action))),
    h("td", { class: "desc muted" }, rule.description ?? ""),
    h("td", { class: "row-actions" }, button("Edit", () => openEditor(rule), { admin: true, cls: "small" }), del),
  );
}

async function load() {
  let out;
  try {
    out = await get("/api/policy/rules");
  } catch (err) {
    notice.replaceChildren(problemBox(err));
    return;
  }
  state.revision = out.revision;
  state.rules = out.rules;
  revision.textContent = `revision ${out.revision}`;
  tbody.replaceChildren(...out.rules.map(row));
  empty.hidden = out.rules.length !== 0;
  root.dataset.loaded = String(Date.now());
  if (!historyBox.hidden) loadHistory();
}

function say(text) { notice.replaceChildren(h("div", { class: "ok", role: "status" }, text)); }

function rollout(out) {
  const bits = [];
  if (out?.applied?.length) bits.push(`applied on ${out.applied.join(", ")}`);
  if (out?.pending?.length) bits.push(`pending on ${out.pending.join(", ")}`);
  if (out?.rejected?.length) bits.push(`rejected by ${out.rejected.map((r) => `${r.id} (${r.error})`).join(", ")}`);
  return bits.length ? ` (${bits.join("; ")})` : "";
}

// Writes name the revision this page read (If-Match): a change made meanwhile by someone
// else is refused (412 POLICY_CONFLICT) rather than overwritten.
const ifMatch = () => (state.revision === null ? {} : { "If-Match": `"${state.revision}"` });

async function setEnabled(rule, enabled) {
  try {
    const out = await api("PUT", `/api/policy/rules/${enc(rule.id)}`, { body: { ...rule, enabled }, headers: ifMatch() });
    say(`${rule.id} ${enabled ? "enabled" : "disabled"}: revision ${out.revision}${rollout(out)}`);
  } catch (err) {
    notice.replaceChildren(problemBox(err));
  }
  await load();
}

async function remove(rule) {
  try {
    await api("DELETE", `/api/policy/rules/${enc(rule.id)}`, { headers: ifMatch() });
    say(`Deleted ${rule.id}.`);
    if (state.editing && state.editing.id === rule.id) closeEditor();
  } catch (err) {
    notice.replaceChildren(problemBox(err));
  }
  await load();
}


// -- the editor ----------------------------------------------------------------------------
const pretty = (v) => JSON.stringify(v, null, 2);

function field(label, input, { cls, hint } = {}) {
  return h("label", { class: `field ${cls ?? ""}`.trim() }, h("span", null, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}

function openEditor(rule) {
  const creating = rule === null;
  const start = structuredClone(rule ?? TEMPLATE);
  state.editing = { id: creating ? null : rule.id };
  notice.replaceChildren();
  let mode = "form";

  const f = {
    id: h("input", { id: "rule-id", name: "id", value: start.id ?? "", placeholder: "left empty: rule-xxxxxxxx", spellcheck: "false", readonly: !creating }),
    enabled: h("input", { id: "rule-enabled", name: "enabled", type: "checkbox" }),
    priority: h("input", { id: "rule-priority", name: "priority", type: "number", step: "1", value: String(start.priority ?? 0) }),
    description: h("input", { id: "rule-description", name: "description", value: start.description ?? "" }),
    phase: h("select", { id: "rule-phase", name: "phase" }, ["request", "response"].map((p) => h("option", { value: p }, p))),
    filter: h("input", { id: "rule-filter", name: "filter", value: start.match?.filter ?? "", spellcheck: "false", autocomplete: "off", placeholder: "~d example.com & ~m POST" }),
    type: h("select", { id: "rule-action-type", name: "action-type" }, Object.keys(ACTIONS).map((t) => h("option", { value: t }, t))),
    action: h("textarea", { id: "rule-action", name: "action", rows: "6", spellcheck: "false" }, pretty(start.action ?? ACTIONS.block)),
  };
  f.enabled.checked = start.enabled !== false;
  f.phase.value = start.match?.phase ?? "request";
  f.type.value = start.action?.type ?? "block";
  f.type.addEventListener("change", () => {
    let current = {};
    try { current = JSON.parse(f.action.value); } catch { /* replaced below */ }
    if (current.type !== f.type.value) f.action.value = pretty(ACTIONS[f.type.value]);
  });
  f.action.addEventListener("input", () => {
    try { const t = JSON.parse(f.action.value).type; if (t in ACTIONS) f.type.value = t; } catch { /* typing */ }
  });
  const filterError = h("div", { id: "rule-filter-error", class: "filter-error", hidden: true });
  const json = h("textarea", { id: "rule-json", name: "rule", rows: "16", spellcheck: "false", "aria-label": "the rule as JSON" });
  const errors = h("div", { id: "rule-errors" });
  const formPane = h("div", { class: "rule-form" },
    h("div", { class: "form-row" },
      field("ID", f.id, { hint: creating ? "letters, digits, _ . - (1-64)" : "" }),
      field("Phase", f.phase),
      field("Priority", f.priority, { hint: "higher runs first" }),
      h("label", { class: "rule-check" }, f.enabled, " enabled"),
    ),
    field("Filter", f.filter, { cls: "wide mono" }),
    filterError,
    field("Description", f.description, { cls: "wide" }),
    h("div", { class: "form-row" }, field("Action", f.type)),
    field("Action fields (JSON)", f.action, { cls: "wide" }),
  );
  const jsonPane = h("div", { class: "rule-json", hidden: true }, json);
  const modeButton = h("button", { type: "button", class: "link", id: "rule-mode" }, "Edit as JSON");

  function fromForm() {
    let action;
    try { action = JSON.parse(f.action.value); } catch (e) {
      throw new ApiProblem(0, { detail: "The action is not valid JSON", errors: [{ field: "body.action", message: e.message }] });
    }
    const out = {
      ...start,
      enabled: f.enabled.checked,
      priority: f.priority.value === "" ? 0 : Number(f.priority.value),
      description: f.description.value,
      match: { ...(start.match ?? {}), filter: f.filter.value, phase: f.phase.value },
      action,
    };
    if (f.id.value.trim()) out.id = f.id.value.trim(); else delete out.id;
    return out;
  }
  function fromJson() {
    try { return JSON.parse(json.value); } catch (e) {
      throw new ApiProblem(0, { detail: "The rule is not valid JSON", errors: [{ field: "body", message: e.message }] });
    }
  }
  function toForm(r) {
    f.id.value = r.id ?? "";
    f.enabled.checked = r.enabled !== false;
    f.priority.value = String(r.priority ?? 0);
    f.description.value = r.description ?? "";
    f.phase.value = r.match?.phase ?? "request";
    f.filter.value = r.match?.filter ?? "";
    f.action.value = pretty(r.action ?? {});
    if (r.action?.type in ACTIONS) f.type.value = r.action.type;
  }
  modeButton.addEventListener("click", () => {
    clearErrors();
    try {
      if (mode === "form") { json.value = pretty(fromForm()); mode = "json"; } else { toForm(fromJson()); mode = "form"; }
    } catch (err) { showErrors(err); return; }
    formPane.hidden = mode !== "form";
    jsonPane.hidden = mode !== "json";
    modeButton.textContent = mode === "form" ? "Edit as JSON" : "Edit as form";
  });

  function clearErrors() {
    errors.replaceChildren();
    filterError.hidden = true;
    filterError.replaceChildren();
    for (const el of editorBox.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    for (const el of editorBox.querySelectorAll(".field-error")) el.remove();
  }

  function inputFor(name) {
    if (mode === "json") return null;
    const rest = name.replace(/^body\./, "");
    if (rest === "id") return f.id;
    if (rest === "enabled") return f.enabled;
    if (rest === "priority") return f.priority;
    if (rest === "description") return f.description;
    if (rest === "match.filter") return f.filter;
    if (rest === "match.phase" || rest === "match") return f.phase;
    if (rest === "action" || rest.startsWith("action.")) return f.action;
    return null;
  }

  function showErrors(err) {
    clearErrors();
    errors.append(problemBox(err));
    for (const e of err.errors ?? []) {
      if (e.position !== undefined && e.position !== null && /filter$/.test(e.field)) {
        const text = mode === "form" ? f.filter.value : (fromJsonQuiet()?.match?.filter ?? "");
        const pos = Math.min(e.position, text.length);
        filterError.hidden = false;
        filterError.append(h("pre", { class: "caret" },
          text.slice(0, pos), h("mark", null, text.slice(pos, pos + 1) || " "), text.slice(pos + 1), "\n",
          " ".repeat(pos) + "^"),
        h("div", { class: "caret-message" }, e.message.replace(/^Value error, /, "")));
        filterError.dataset.position = String(e.position);
        if (mode === "json") jsonPane.append(filterError);
        else formPane.insertBefore(filterError, f.filter.closest(".field").nextSibling);
        if (mode === "form") { f.filter.focus(); f.filter.setSelectionRange(pos, pos + 1); }
      }
      const el = inputFor(e.field) ?? (mode === "json" ? json : null);
      if (!el) continue;
      el.setAttribute("aria-invalid", "true");
      if (el === f.filter && !filterError.hidden) continue;
      el.closest(".field, .rule-check, .rule-json")?.append(h("div", { class: "field-error", role: "alert" }, `${e.field}: ${e.message}`));
    }
  }
  function fromJsonQuiet() { try { return JSON.parse(json.value); } catch { return null; } }

  async function save() {
    clearErrors();
    let body;
    try { body = mode === "form" ? fromForm() : fromJson(); } catch (err) { showErrors(err); return; }
    try {
      const out = creating
        ? await api("POST", "/api/policy/rules", { body })
        : await api("PUT", `/api/policy/rules/${enc(rule.id)}`, { body, headers: ifMatch() });
      say(`${creating ? "Added" : "Saved"} ${out.rule?.id ?? body.id}: revision ${out.revision}${rollout(out)}`);
      closeEditor();
      await load();
    } catch (err) {
      showErrors(err);
      if (err.status === 412) { // someone else wrote meanwhile: keep this edit, show theirs
        errors.append(h("p", { class: "hint", id: "rule-stale" },
          "The rules changed since this page read them. Your edit is still here and the list " +
          "now shows the current rules: save again to write yours over them."));
        await load();
      }
    }
  }

  editorBox.replaceChildren(
    h("div", { class: "toolbar" },
      h("h2", null, creating ? "New rule" : ["Edit ", h("code", null, rule.id)]),
      h("div", { class: "row" }, modeButton)),
    formPane,
    jsonPane,
    errors,
    h("div", { class: "actions" },
      (() => { const b = button(creating ? "Add rule" : "Save", save, { admin: true, cls: "primary" }); b.id = "rule-save"; return b; })(),
      (() => { const b = button("Cancel", closeEditor); b.id = "rule-cancel"; return b; })(),
      h("span", { class: "muted" }, "nothing is saved until the whole rule is valid"),
    ),
  );
  editorBox.hidden = false;
  editorBox.scrollIntoView({ block: "nearest" });
  (creating ? f.id : f.filter).focus();
}

function closeEditor() {
  state.editing = null;
  editorBox.hidden = true;
  editorBox.replaceChildren();
}

// -- history -------------------------------------------------------------------------------
async function toggleHistory() {
  historyBox.hidden = !historyBox.hidden;
  if (!historyBox.hidden) await loadHistory();
}

async function loadHistory() {
  let out;
  try {
    out = await get("/api/policy/history", { limit: 20 });
  } catch (err) {
    historyBox.replaceChildren(problemBox(err));
    return;
  }
  historyBox.replaceChildren(
    h("h2", null, "History ", h("span", { class: "muted" }, "(newest first)")),
    h("table", { class: "history" },
      h("thead", null, h("tr", null, ["Revision", "When", "Operation", "Rules", ""].map((c) => h("th", null, c)))),
      h("tbody", null, out.revisions.map((r) => {
        const ids = (r.policy?.rules ?? []).map((x) => x.id);
        const current = r.revision === state.revision;
        return h("tr", { dataset: { revision: String(r.revision) } },
          h("td", { class: "num" }, String(r.revision), current ? h("span", { class: "tag" }, "current") : null),
          h("td", null, r.time ? fmtDate(Date.parse(r.time) / 1000) : ""),
          h("td", null, r.operation ?? ""),
          h("td", { class: "mono ids" }, ids.length ? ids.join(", ") : h("span", { class: "muted" }, "(none)")),
          h("td", null, current || r.operation !== "put" ? null : confirmButton("Roll back", "Write it again?", () => rollback(r.revision), { cls: "small" })),
        );
      }))),
  );
}

async function rollback(rev) {
  try {
    const out = await api("POST", "/api/policy/rollback", { body: { revision: rev } });
    say(`Rolled back to revision ${rev}: now revision ${out.revision}${rollout(out)}`);
  } catch (err) {
    notice.replaceChildren(problemBox(err));
  }
  await load();
}

if (!CAN_ACT) root.dataset.readOnly = "true";
load();
