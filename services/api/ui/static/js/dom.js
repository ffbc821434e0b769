// Building DOM without innerHTML: every recorded value (hosts, paths, headers, bodies) is
// attacker-controlled, so it only ever becomes text nodes and attribute values.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const app = () => document.getElementById("app");

export function fmtTime(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  return d.toLocaleTimeString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

export function fmtDate(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString(undefined, { hour12: false }) : "";
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined || ms < 0) return "";
  return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function statusClass(flow) {
  if (flow.state === "active") return "active";
  if (flow.state === "error" || flow.state === "killed") return flow.state;
  const s = flow.status ?? (flow.response && flow.response.status);
  return s ? `s${Math.floor(s / 100)}xx` : "other";
}

// A message under a form or at the top of a view; field errors of a 422 listed by field.
export function problemBox(err) {
  const box = h("div", { class: "problem", role: "alert" }, h("b", null, err.message));
  if (err.code) box.append(" ", h("code", null, err.code));
  if (err.errors?.length) {
    box.append(h("ul", null, err.errors.map((e) => h("li", null, h("code", null, e.field), ": ", e.message))));
  }
  return box;
}

export function button(label, onclick, { admin = false, title, cls } = {}) {
  const canAct = document.body.dataset.scope === "admin";
  const disabled = admin && !canAct;
  return h("button", {
    type: "button",
    class: cls,
    onclick,
    disabled,
    title: disabled ? "needs an admin key" : title,
  }, label);
}

// A button that asks to be pressed twice (no confirm() dialog): the first press arms it
// for four seconds, the second acts.
export function confirmButton(label, ask, fn, { id, cls } = {}) {
  let armed = null;
  const reset = () => { armed = null; b.textContent = label; b.classList.remove("armed"); };
  const b = button(label, async () => {
    if (!armed) {
      b.textContent = ask;
      b.classList.add("armed");
      armed = setTimeout(reset, 4000);
      return;
    }
    clearTimeout(armed);
    reset();
    await fn();
  }, { admin: true, cls: `danger ${cls ?? ""}`.trim() });
  if (id) b.id = id;
  return b;
}
