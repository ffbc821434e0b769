// Intercept: the exchanges intercept rules hold, live from the approvals stream (a
// snapshot, then created / resolved / timeout), each with what can be decided about it
// (approve and cache, allow once, deny, modify), and the cached approvals in force.
// Every value of a held exchange comes from the traffic: it only ever becomes text.
import { ApiProblem, CAN_ACT, api, get, stream } from "./api.js";
import { app, button, confirmButton, fmtDate, h, problemBox } from "./dom.js";

const root = app();
const state = {
  cards: new Map(), // approval id -> { el, approval }
  skew: 0, // server clock - browser clock, seconds (from the snapshot)
  feed: null,
};

const notice = h("div", { id: "notice", class: "notice", "aria-live": "polite" });
const liveState = h("span", { id: "live-state", class: "badge" }, "connecting");
const count = h("span", { id: "pending-count", class: "muted" });
const missing = h("div", { id: "missing", class: "problem", hidden: true });
const empty = h("p", { id: "pending-empty", class: "muted empty" }, "Nothing is held. Exchanges that match an intercept rule wait here for a decision.");
const list = h("div", { id: "pending", class: "held-list" });
const cachedBody = h("tbody", { id: "cached-rows" });
const cachedEmpty = h("p", { id: "cached-empty", class: "muted", hidden: true }, "No cached approvals.");
const cachedNotice = h("div", { id: "cached-notice" });
const forgetAll = confirmButton("Forget all", "Forget every one?", () => forgetEverything(), { id: "forget-all" });

root.append(
  h("section", { class: "toolbar" },
    h("div", { class: "row" }, h("h1", { class: "view-title" }, "Held exchanges"), count),
    h("div", { class: "row" }, liveState),
  ),
  notice,
  missing,
  empty,
  list,
  h("section", { class: "cached" },
    h("div", { class: "toolbar" },
      h("div", { class: "row" }, h("h2", null, "Cached approvals"),
        h("span", { class: "muted" }, "later exchanges of the same rule, method and URL (any query string) pass without being held")),
      h("div", { class: "row" }, button("Refresh", () => loadCached(), { cls: "small" }), forgetAll),
    ),
    cachedNotice,
    h("table", { id: "cached", class: "cached-table" },
      h("thead", null, h("tr", null, ["Rule", "Method", "URL", "By", "Expires in", ""].map((c) => h("th", null, c)))),
      cachedBody),
    cachedEmpty,
  ),
);

// -- small pieces ------------------------------------------------------------------------
const now = () => Date.now() / 1000 + state.skew;
const enc = encodeURIComponent;

function left(seconds) {
  if (seconds <= 0) return "expiring…";
  const s = Math.ceil(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  const hrs = Math.floor(s / 3600);
  return hrs < 48 ? `${hrs}h ${Math.floor((s % 3600) / 60)}m` : `${Math.floor(hrs / 24)}d ${hrs % 24}h`;
}


function headerTable(headers) {
  return h("table", { class: "headers" }, h("tbody", null,
    (headers ?? []).map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v)))));
}

function say(box, text, cls = "ok") {
  box.replaceChildren(h("div", { class: cls, role: "status" }, text));
}

// -- the pending cards -------------------------------------------------------------------
function card(a) {
  const req = a.request ?? {};
  const res = a.response;
  const countdown = h("span", { class: "countdown", dataset: { expires: String(a.expires_at) }, title: `held until ${fmtDate(a.expires_at)}, then ${a.on_timeout}` });
  const cardNotice = h("div", { class: "card-notice" });
  const editor = h("div", { class: "held-editor", hidden: true });
  const ttl = h("input", { type: "number", class: "ttl", min: "1", step: "1", placeholder: "TTL s", title: "seconds the approval stays cached (empty: the API's default)", "aria-label": "approval TTL in seconds" });
  const el = h("article", { class: `held held-${a.phase}`, dataset: { id: a.id, phase: a.phase } },
    h("header", { class: "held-head" },
      h("span", { class: `phase-tag phase-tag-${a.phase}` }, a.phase),
      h("span", { class: "method" }, req.method),
      h("span", { class: "url", title: req.url }, req.url),
      countdown,
    ),
    res ? h("div", { class: "held-status" }, "upstream answered ", h("b", { class: "status" }, String(res.status)), " ", res.reason ?? "") : null,
    h("div", { class: "held-meta muted" },
      "rule ", h("code", { class: "rule" }, a.rule),
      " · replica ", h("span", { class: "replica" }, a.replica),
      " · on timeout ", h("span", { class: `on-timeout ${a.on_timeout}` }, a.on_timeout),
      req.body_size !== null && req.body_size !== undefined ? ` · body ${req.body_size} B` : null,
      " · ", h("a", { href: `/ui/flows/${enc(a.flow_id)}`, class: "flow-link" }, "flow"),
    ),
    h("details", { class: "hdrs request-headers" },
      h("summary", null, `Request headers (${(req.headers ?? []).length})`), headerTable(req.headers)),
    res ? h("details", { class: "hdrs response-headers" },
      h("summary", null, `Response headers (${(res.headers ?? []).length})`), headerTable(res.headers)) : null,
    h("div", { class: "actions held-actions" },
      h("span", { class: "approve-group" },
        button("Approve", async () => {
          const r = await decide(a, "approve", ttl.value ? { ttl_s: Number(ttl.value) } : undefined, cardNotice, ttl);
          if (r instanceof ApiProblem) markFields(r, { "body.ttl_s": ttl }, el);
        },
          { admin: true, cls: "primary", title: "let it pass and cache the approval for this rule, method and URL" }),
        ttl),
      button("Allow once", () => decide(a, "allow-once", undefined, cardNotice), { admin: true, title: "let it pass; nothing cached" }),
      button("Deny…", () => openDeny(a, editor, cardNotice), { admin: true, cls: "danger" }),
      button("Modify…", () => openModify(a, editor, cardNotice), { admin: true }),
    ),
    editor,
    cardNotice,
  );
  if (!CAN_ACT) ttl.disabled = true;
  return el;
}

function render() {
  const n = state.cards.size;
  count.textContent = n ? `${n} waiting` : "";
  empty.hidden = n !== 0;
}

function add(a) {
  if (state.cards.has(a.id)) return;
  const el = card(a);
  state.cards.set(a.id, { el, approval: a });
  list.append(el);
  tick();
  render();
}

function drop(id, why) {
  const known = state.cards.get(id);
  if (!known) return;
  state.cards.delete(id);
  known.el.remove();
  if (why) say(notice, why, "muted");
  render();
}

function snapshot(data) {
  state.skew = (data.timestamp ?? Date.now() / 1000) - Date.now() / 1000;
  const ids = new Set((data.pending ?? []).map((p) => p.id));
  for (const id of [...state.cards.keys()]) if (!ids.has(id)) drop(id);
  for (const p of data.pending ?? []) add(p);
  missing.hidden = !(data.missing ?? []).length;
  missing.replaceChildren(`Replicas that did not answer (what they hold is not listed): ${(data.missing ?? []).join(", ")}`);
  render();
}

function describe(a) {
  return `${a.request?.method ?? ""} ${a.request?.url ?? ""}`;
}

const PAST = { approve: "approved", allow_once: "allowed once", deny: "denied", modify: "sent modified" };

function onEvent(data) {
  switch (data.type) {
    case "snapshot": snapshot(data); liveState.textContent = "live"; liveState.dataset.state = "live"; break;
    case "pending_created": if (data.approval) add(data.approval); break;
    case "pending_resolved": {
      const known = state.cards.get(data.id);
      if (known) drop(data.id, `${describe(known.approval)}: ${PAST[data.decision] ?? data.outcome ?? data.decision}${data.by ? ` by ${data.by}` : ""}`);
      if (data.decision === "approve") loadCached();
      break;
    }
    case "pending_timeout": {
      const known = state.cards.get(data.id);
      if (known) drop(data.id, `${describe(known.approval)}: timed out (${data.on_timeout})`);
      break;
    }
    default: break;
  }
}

// one timer for every countdown
function tick() {
  const t = now();
  for (const { el, approval } of state.cards.values()) {
    const c = el.querySelector(".countdown");
    const rest = approval.expires_at - t;
    c.textContent = left(rest);
    c.classList.toggle("soon", rest < 10);
  }
  for (const tr of cachedBody.rows) {
    const rest = Number(tr.dataset.expires) - t;
    tr.querySelector(".expires").textContent = left(rest);
    if (rest <= 0) tr.classList.add("expired");
  }
}
setInterval(tick, 1000);

// -- decisions ---------------------------------------------------------------------------
const DONE = { approve: "Approved", "allow-once": "Allowed once", deny: "Denied", modify: "Sent modified" };

async function decide(a, verb, body, box, ...fields) {
  box.replaceChildren();
  for (const f of fields) f?.removeAttribute?.("aria-invalid");
  try {
    await api("POST", `/api/approvals/pending/${enc(a.id)}/${verb}`, { body: body ?? {} });
  } catch (err) {
    if (err instanceof ApiProblem && [404, 409].includes(err.status)) {
      drop(a.id, `${describe(a)}: ${err.message}`); // resolved elsewhere meanwhile
      return false;
    }
    box.replaceChildren(problemBox(err));
    return err;
  }
  drop(a.id, `${DONE[verb]}: ${describe(a)}`);
  if (verb === "approve") loadCached();
  return true;
}

function field(label, input, cls) {
  return h("label", { class: `field ${cls ?? ""}`.trim() }, h("span", null, label), input);
}

function openDeny(a, editor, box) {
  if (!editor.hidden && editor.dataset.kind === "deny") { editor.hidden = true; return; }
  const status = h("input", { type: "number", name: "status", min: "200", max: "599", placeholder: "403", class: "status-input", "aria-label": "deny status" });
  const body = h("textarea", { name: "body", rows: "3", placeholder: "the answer's body (optional)", "aria-label": "deny body" });
  editor.dataset.kind = "deny";
  editor.replaceChildren(
    h("div", { class: "form-row" }, field("Status", status), field("Body", body, "grow")),
    h("div", { class: "actions" },
      button("Send deny", async () => {
        const out = {};
        if (status.value !== "") out.status = Number(status.value);
        if (body.value !== "") out.body = body.value;
        const r = await decide(a, "deny", out, box, status, body);
        if (r instanceof ApiProblem) markFields(r, { "body.status": status, "body.body": body }, editor);
      }, { admin: true, cls: "danger" }),
      button("Cancel", () => { editor.hidden = true; }),
    ),
  );
  editor.hidden = false;
  status.focus();
}

// Header rows: name and value inputs, remove, add.
function headerRows(headers) {
  const rows = h("div", { class: "header-rows" });
  const addRow = (k = "", v = "") => {
    const row = h("div", { class: "header-row" },
      h("input", { class: "hname", value: k, placeholder: "Name", "aria-label": "header name", spellcheck: "false" }),
      h("input", { class: "hvalue", value: v, placeholder: "value", "aria-label": "header value", spellcheck: "false" }),
      h("button", { type: "button", class: "link remove", title: "remove this header", onclick: () => row.remove() }, "×"),
    );
    rows.append(row);
    return row;
  };
  for (const [k, v] of headers ?? []) addRow(k, v);
  const wrap = h("div", { class: "headers-editor" }, rows,
    h("button", { type: "button", class: "link add-header", onclick: () => addRow().querySelector("input").focus() }, "+ header"));
  wrap.read = () => [...rows.children].map((r) => [r.querySelector(".hname").value, r.querySelector(".hvalue").value])
    .filter(([k, v]) => k !== "" || v !== "");
  wrap.row = (i) => rows.children[i] ?? null;
  return wrap;
}

function openModify(a, editor, box) {
  if (!editor.hidden && editor.dataset.kind === "modify") { editor.hidden = true; return; }
  const isReq = a.phase === "request";
  const held = isReq ? a.request : a.response;
  const headers = headerRows(held.headers);
  const body = h("textarea", { name: "body", rows: "4", placeholder: isReq ? "a new body (empty: keep the held one)" : "a new body (empty: keep the upstream's)", "aria-label": "new body" });
  const replaceEmpty = h("input", { type: "checkbox", name: "empty-body" });
  let top;
  const inputs = { "body": body };
  if (isReq) {
    const method = h("input", { name: "method", value: held.method, class: "method-input", "aria-label": "method", spellcheck: "false" });
    const url = h("input", { name: "url", value: held.url, class: "url-input", "aria-label": "URL", spellcheck: "false" });
    inputs.method = method;
    inputs.url = url;
    top = h("div", { class: "form-row" }, field("Method", method), field("URL", url, "grow"));
  } else {
    const status = h("input", { type: "number", name: "status", min: "200", max: "599", value: String(held.status), class: "status-input", "aria-label": "status" });
    inputs.status = status;
    top = h("div", { class: "form-row" }, field("Status", status));
  }
  const part = isReq ? "request" : "response";
  editor.dataset.kind = "modify";
  editor.replaceChildren(
    h("h3", null, `Modify the held ${part}`),
    top,
    h("div", { class: "field" }, h("span", null, "Headers"), headers),
    field("Body", body, "grow"),
    h("label", { class: "held-check" }, replaceEmpty, " send an empty body"),
    h("div", { class: "actions" },
      button("Send modified", async () => {
        const edit = {};
        if (isReq) {
          if (inputs.method.value !== held.method) edit.method = inputs.method.value;
          if (inputs.url.value !== held.url) edit.url = inputs.url.value;
        } else if (inputs.status.value !== String(held.status)) {
          edit.status = inputs.status.value === "" ? null : Number(inputs.status.value);
        }
        const hs = headers.read();
        if (JSON.stringify(hs) !== JSON.stringify(held.headers ?? [])) edit.headers = hs;
        if (body.value !== "" || replaceEmpty.checked) edit.body = body.value;
        const clear = [...Object.values(inputs), ...editor.querySelectorAll(".header-row input")];
        const r = await decide(a, "modify", { [part]: edit }, box, ...clear);
        if (r instanceof ApiProblem) {
          const map = {};
          for (const [k, el] of Object.entries(inputs)) map[`body.${part}.${k}`] = el;
          markFields(r, map, editor, (f) => {
            const m = f.match(new RegExp(`^body\\.${part}\\.headers\\.(\\d+)(?:\\.(\\d))?`));
            if (!m) return f === `body.${part}.headers` ? headers : null;
            const row = headers.row(Number(m[1]));
            return row?.querySelector(m[2] === "1" ? ".hvalue" : ".hname") ?? row;
          });
        }
      }, { admin: true, cls: "primary" }),
      button("Cancel", () => { editor.hidden = true; }),
    ),
  );
  editor.hidden = false;
}

// A 422's field errors next to the inputs they name (the problem box lists them all).
function markFields(err, map, scope, resolve) {
  for (const old of scope.querySelectorAll(".field-error")) old.remove();
  for (const e of err.errors ?? []) {
    const el = map[e.field] ?? resolve?.(e.field) ?? null;
    if (!el) continue;
    el.setAttribute("aria-invalid", "true");
    const note = h("div", { class: "field-error", role: "alert" }, e.message);
    note.dataset.field = e.field;
    const holder = el.closest(".field");
    if (holder) holder.append(note); else (el.closest(".header-row") ?? el).after(note);
  }
}

// -- cached approvals --------------------------------------------------------------------
async function loadCached() {
  let out;
  try {
    out = await get("/api/approvals/cached");
  } catch (err) {
    cachedNotice.replaceChildren(problemBox(err));
    return;
  }
  const t = Date.now() / 1000;
  cachedBody.replaceChildren(...out.cached.map((c) => {
    const tr = h("tr", { dataset: { key: c.key, expires: String(t + state.skew + c.expires_in_s) } },
      h("td", null, h("code", null, c.rule)),
      h("td", { class: "method" }, c.method),
      h("td", { class: "url mono", title: c.url }, c.url),
      h("td", { class: "muted" }, c.by ?? ""),
      h("td", { class: "expires num", title: `until ${fmtDate(c.expires_at)}` }, left(c.expires_in_s)),
      h("td", { class: "row-actions" }, button("Forget", () => forget(c), { admin: true, cls: "danger small" })),
    );
    return tr;
  }));
  cachedEmpty.hidden = out.cached.length !== 0;
  cachedBody.closest("table").hidden = out.cached.length === 0;
  forgetAll.disabled = !CAN_ACT || out.cached.length === 0;
}

async function forget(c) {
  try {
    await api("DELETE", "/api/approvals/cached/entry", { params: { rule: c.rule, method: c.method, url: c.url } });
    say(cachedNotice, `Forgot ${c.method} ${c.url} (${c.rule}).`);
  } catch (err) {
    cachedNotice.replaceChildren(problemBox(err));
  }
  loadCached();
}

async function forgetEverything() {
  try {
    await api("DELETE", "/api/approvals/cached");
    say(cachedNotice, "Forgot every cached approval.");
  } catch (err) {
    cachedNotice.replaceChildren(problemBox(err));
  }
  loadCached();
}

// -- go ------------------------------------------------------------------------------------
render();
loadCached();
setInterval(loadCached, 30_000);
state.feed = stream("/api/approvals/pending", null, {
  onEvent,
  onState: (s) => { liveState.textContent = s; liveState.dataset.state = s; },
});
