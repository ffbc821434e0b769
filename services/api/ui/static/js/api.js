// The REST API from the browser: same-origin fetches with the session cookie; mutating
// calls carry the page's CSRF token. Errors become ApiProblem (the RFC 9457 document).

const CSRF = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
export const SCOPE = document.body.dataset.scope ?? "read";
export const CAN_ACT = SCOPE === "admin";

export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem?.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem ?? {};
    this.code = this.problem.code ?? null;
    this.errors = this.problem.errors ?? [];
  }
}

export async function api(method, path, { body, params, headers, raw } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const init = { method, credentials: "same-origin", headers: { ...(headers ?? {}) } };
  if (!["GET", "HEAD"].includes(method)) init.headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    init.headers["Content-Type"] ??= "application/json";
  }
  const res = await fetch(url, init);
  if (res.status === 401) {
    location.assign(`/ui/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    throw new ApiProblem(401, { detail: "signed out" });
  }
  if (!res.ok) {
    let problem = null;
    try { problem = await res.json(); } catch { /* not JSON */ }
    throw new ApiProblem(res.status, problem);
  }
  if (raw) return res;
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") ?? "";
  return type.includes("json") ? res.json() : res.text();
}

export const get = (path, params) => api("GET", path, { params });

// An EventSource that says when it is (re)connected; the browser resumes with
// Last-Event-ID by itself. ``dropped`` (a slow reader) reopens from the id it names.
export function stream(path, params, { onEvent, onState }) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  let source = null;
  let closed = false;
  const open = (after) => {
    if (after) url.searchParams.set("last_event_id", after);
    source = new EventSource(url);
    source.addEventListener("connected", () => onState?.("live"));
    source.addEventListener("message", (e) => onEvent(JSON.parse(e.data), e));
    for (const name of ["pending_created", "pending_resolved", "pending_timeout", "snapshot"]) {
      source.addEventListener(name, (e) => onEvent(JSON.parse(e.data), e));
    }
    source.addEventListener("dropped", (e) => {
      source.close();
      const { last_event_id: last } = JSON.parse(e.data);
      if (!closed) setTimeout(() => open(last), 500);
    });
    source.onerror = () => {
      const ended = source.readyState === EventSource.CLOSED;
      onState?.(ended ? "closed" : "reconnecting");
      // refused for good (the session ended, the key was revoked): ask to sign in again
      if (ended && !closed) api("GET", "/api/filter-help").catch(() => {});
    };
  };
  open(null);
  return { close() { closed = true; source?.close(); onState?.("paused"); } };
}

// A live view's feed, its state badge and its Pause/Live button. ``open(onState)`` opens
// the stream (``stream()``) and returns it; ``restart()`` reopens it (a new filter).
export function liveFeed(badge, toggle, open, { live = true } = {}) {
  let feed = null;
  let on = live;
  const show = (s) => { badge.textContent = s; badge.dataset.state = s; };
  const restart = () => {
    feed?.close();
    feed = null;
    if (!on) { show("paused"); return; }
    show("connecting");
    feed = open(show);
  };
  toggle.textContent = on ? "Pause" : "Live";
  toggle.addEventListener("click", () => {
    on = !on;
    toggle.textContent = on ? "Pause" : "Live";
    restart();
  });
  return { restart };
}
