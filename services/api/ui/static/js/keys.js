// Keys: every key the API honours (never a secret), making a runtime key (its secret shown
// this once, with a copy button) and revoking one. Configured keys come from the settings
// and say why they cannot be revoked here.
import { api, get } from "./api.js";
import { app, button, fmtDate, h, problemBox } from "./dom.js";

const root = app();
const me = document.body.dataset.key ?? "";
const message = h("div", { id: "keys-message" });
const secretBox = h("div", { id: "new-key" });
const tbody = h("tbody", { id: "key-rows" });
const scopeIn = h("select", { id: "key-scope", "aria-label": "scope" },
  h("option", { value: "read" }, "read: view everything, change nothing"),
  h("option", { value: "admin" }, "admin: everything"));
const nameIn = h("input", { id: "key-name", placeholder: "what it is for (e.g. grafana, alice's laptop)", maxlength: "200", size: "40", "aria-label": "key name", autocomplete: "off" });
const createBtn = button("Create key", null, { admin: true, cls: "primary" });
createBtn.type = "submit";

root.append(
  h("section", { class: "panel" },
    h("h2", null, "New key"),
    h("form", { class: "key-form", onsubmit: (e) => { e.preventDefault(); create(); } }, scopeIn, nameIn, createBtn),
    secretBox,
  ),
  message,
  h("table", { class: "keys compact" },
    h("thead", null, h("tr", null, ["Id", "Scope", "Source", "Name", "Created", "Created by", "Last used", ""].map((c) => h("th", null, c)))),
    tbody),
);

async function load() {
  const { keys } = await get("/api/keys");
  tbody.replaceChildren(...keys.map(row));
  root.dataset.loaded = String(Date.now());
}

function row(k) {
  const tr = h("tr", { dataset: { key: k.id, source: k.source } },
    h("td", null, h("code", null, k.id), k.id === me ? h("span", { class: "tag", title: "this browser signed in with it" }, " you") : null),
    h("td", null, h("span", { class: `badge scope-${k.scope}` }, k.scope)),
    h("td", null, k.source === "settings" ? "configured" : "runtime"),
    h("td", null, k.name ?? ""),
    h("td", { class: "date" }, fmtDate(k.created)),
    h("td", null, k.created_by ? h("code", null, k.created_by) : ""),
    h("td", { class: "date" }, k.last_used ? fmtDate(k.last_used) : h("span", { class: "muted" }, "never")),
    h("td", { class: "why" }),
  );
  const cell = tr.lastElementChild;
  if (k.source === "settings") {
    cell.append("configured in the settings (FLEET_API_KEYS or the key file): remove it there to revoke it");
  } else {
    const revoke = button("Revoke", () => {
      const sure = button(`Revoke ${k.id} now`, () => doRevoke(k), { admin: true, cls: "danger confirm" });
      const cancel = button("Cancel", () => cell.replaceChildren(revoke), { cls: "link" });
      cell.replaceChildren(...[sure, " ", cancel, k.id === me ? h("div", null, "this ends your own session") : null].filter(Boolean));
    }, { admin: true, cls: "danger" });
    cell.append(revoke);
  }
  return tr;
}

async function doRevoke(k) {
  try {
    await api("DELETE", `/api/keys/${encodeURIComponent(k.id)}`);
    message.replaceChildren(h("div", { class: "ok", role: "status", id: "revoked" }, `Key ${k.id} revoked: it is refused from now on.`));
  } catch (err) {
    message.replaceChildren(problemBox(err));
  }
  await load();
}

async function create() {
  message.replaceChildren();
  secretBox.replaceChildren();
  try {
    const k = await api("POST", "/api/keys", { body: { scope: scopeIn.value, name: nameIn.value.trim() } });
    const secret = h("code", { id: "secret", class: "secret" }, k.secret);
    const copied = h("span", { class: "muted", id: "copied" });
    secretBox.replaceChildren(h("div", { class: "secret-box", role: "status" },
      h("p", null, h("b", null, `Key ${k.id} (${k.scope}) created. Copy its secret now: it is shown this once `),
        "and cannot be read again (only its SHA-256 is stored). Lost it? Revoke the key and make another."),
      h("p", null, secret, " ",
        button("Copy", async () => {
          try { await navigator.clipboard.writeText(k.secret); copied.textContent = "copied"; } catch {
            const range = document.createRange(); range.selectNodeContents(secret);
            getSelection().removeAllRanges(); getSelection().addRange(range);
            copied.textContent = "selected: press Ctrl+C";
          }
        }, { title: "copy the secret to the clipboard" }), " ", copied,
        " ", button("Done, hide it", () => secretBox.replaceChildren(), { cls: "link" })),
    ));
    nameIn.value = "";
    await load();
  } catch (err) {
    message.replaceChildren(problemBox(err));
  }
}

load();
