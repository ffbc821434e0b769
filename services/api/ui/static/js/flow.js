// One flow: headers, bodies (decoded; JSON pretty-printed, images shown, binary as hex),
// its timing waterfall, and what can be done with it (kill, replay, HAR, copy as curl).
import { api, get } from "./api.js";
import { app, button, fmtBytes, fmtDate, h, problemBox, statusClass } from "./dom.js";
import { flowWaterfall } from "./waterfall.js";

const root = app();
const id = root.dataset.flowId;
const notice = h("div", { id: "notice" });

function url(f) {
  const port = (f.scheme === "https" && f.port === 443) || (f.scheme === "http" && f.port === 80) ? "" : `:${f.port}`;
  return `${f.scheme}://${f.host}${port}${f.path}`;
}

function headerTable(headers, cls) {
  return h("table", { class: `headers ${cls}` }, h("tbody", null,
    (headers ?? []).map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v)))));
}

function header(headers, name) {
  const found = (headers ?? []).find(([k]) => k.toLowerCase() === name);
  return found ? found[1] : "";
}

function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function hexdump(bytes, limit = 4096) {
  const lines = [];
  for (let off = 0; off < Math.min(bytes.length, limit); off += 16) {
    const chunk = bytes.slice(off, off + 16);
    const hex = [...chunk].map((b) => b.toString(16).padStart(2, "0")).join(" ");
    const ascii = [...chunk].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${off.toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  ${ascii}`);
  }
  if (bytes.length > limit) lines.push(`… ${bytes.length - limit} more bytes`);
  return lines.join("\n");
}

// A body as people want to read it; the raw bytes are one link away.
function bodyView(flowId, which, part) {
  const box = h("div", { class: "body", id: `${which}-body` });
  if (!part || part.body === null || part.body === undefined) {
    box.append(h("p", { class: "muted" }, part ? "(not recorded yet: the flow is active)" : "(none)"));
    return box;
  }
  if (part.body === "") { box.append(h("p", { class: "muted" }, "(empty)")); return box; }
  const type = header(part.headers, "content-type").toLowerCase();
  const notes = [fmtBytes(part.decoded_size ?? part.size)];
  if (part.decoded) notes.push(`decoded from ${part.content_encoding}`);
  if (part.decode_error) notes.push(`not decoded (${part.decode_error})`);
  if (part.truncated) notes.push("truncated");
  box.append(h("p", { class: "muted" }, notes.join(" · "), " · ",
    h("a", { href: `/api/flows/${encodeURIComponent(flowId)}/${which}/body?decode=true`, download: `${flowId}-${which}` }, "raw")));
  if (part.encoding === "base64") {
    const bytes = b64bytes(part.body);
    if (type.startsWith("image/") && !type.includes("svg")) {
      const img = h("img", { class: "preview", alt: `${which} image` });
      img.src = URL.createObjectURL(new Blob([bytes], { type }));
      box.append(img);
    } else {
      box.append(h("pre", { class: "hex" }, hexdump(bytes)));
    }
    return box;
  }
  let text = part.body;
  if (type.includes("json") || /^\s*[[{]/.test(text)) {
    try { text = JSON.stringify(JSON.parse(text), null, 2); } catch { /* as recorded */ }
  }
  box.append(h("pre", { class: "text" }, text));
  return box;
}

// A curl command that repeats the request: every value single-quoted for a POSIX shell.
export function curlOf(f) {
  const q = (s) => `'${String(s).replaceAll("'", "'\\''")}'`;
  const parts = ["curl", "-X", q(f.method)];
  for (const [k, v] of f.request?.headers ?? []) {
    if (["host", "content-length", "connection", "proxy-connection"].includes(k.toLowerCase())) continue;
    parts.push("-H", q(`${k}: ${v}`));
  }
  const body = f.request?.body;
  if (body) parts.push("--data-binary", f.request.encoding === "base64" ? q(atob(body)) : q(body));
  parts.push(q(url(f)));
  return parts.join(" ");
}

async function act(label, fn) {
  notice.replaceChildren();
  try {
    const out = await fn();
    notice.append(h("div", { class: "ok", role: "status" }, label, out ? h("span", null, " ", out) : null));
  } catch (err) {
    notice.append(problemBox(err));
  }
}

async function show() {
  let f;
  try {
    f = await get(`/api/flows/${encodeURIComponent(id)}`, { decode: "true" });
  } catch (err) {
    root.replaceChildren(problemBox(err));
    return;
  }
  const curl = h("pre", { id: "curl", class: "text", hidden: true }, curlOf(f));
  const status = f.response ? `${f.response.status} ${f.response.reason ?? ""}` : f.state;
  root.replaceChildren(
    h("section", { class: "flowhead" },
      h("h1", { class: statusClass(f) }, h("span", { class: "method" }, f.method), " ", h("span", { class: "url" }, url(f))),
      h("p", null, h("b", { id: "flow-status" }, status), " · ", f.state, " · replica ", f.replica ?? "?", " · ", fmtDate(f.timings?.start),
        (f.tags ?? []).map((t) => [" ", h("span", { class: "tag" }, t)]),
        f.replay_of ? [" · replay of ", h("a", { href: `/ui/flows/${encodeURIComponent(f.replay_of)}` }, f.replay_of)] : null),
      f.error ? h("p", { class: "error" }, f.error) : null,
      h("div", { class: "actions" },
        f.state === "active"
          ? button("Kill", () => act("Killed.", () => api("DELETE", `/api/flows/${encodeURIComponent(id)}`)), { admin: true, title: "cut the connection" })
          : null,
        button("Replay", () => act("Replayed:", async () => {
          const r = await api("POST", `/api/flows/${encodeURIComponent(id)}/replay`);
          const nid = r?.flow_id ?? r?.id;
          return nid ? h("a", { href: `/ui/flows/${encodeURIComponent(nid)}`, id: "replayed" }, nid) : null;
        }), { admin: true }),
        h("a", { class: "button", id: "flow-har", href: `/api/flows/${encodeURIComponent(id)}/har`, download: `${id}.har` }, "Download HAR"),
        button("Copy as curl", async () => {
          curl.hidden = false;
          try { await navigator.clipboard.writeText(curl.textContent); notice.replaceChildren(h("div", { class: "ok" }, "Copied.")); } catch { /* shown below */ }
        }),
      ),
      notice,
      curl,
    ),
    h("section", { class: "grid2" },
      h("div", null, h("h2", null, "Request"), headerTable(f.request?.headers, "request"), bodyView(id, "request", f.request)),
      h("div", null, h("h2", null, "Response"), f.response ? [headerTable(f.response.headers, "response"), bodyView(id, "response", f.response)] : h("p", { class: "muted" }, "(no response)")),
    ),
    h("section", null, h("h2", null, "Timing"), flowWaterfall(f)),
    h("section", null, h("h2", null, "Details"), h("pre", { class: "text small" }, JSON.stringify({
      client: f.client, server: f.server, http_version: f.http_version, stats: f.stats,
      policy: f.policy, intercept: f.intercept, trace_id: f.trace_id,
    }, null, 2))),
  );
}

show();
