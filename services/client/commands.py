"""The client commands (click): each is one or two REST calls and a rendering.

Exit codes: 0 done, 1 the API refused (its problem is printed) or cannot be reached,
2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.text import Text

from services.client.http import (
    DEFAULT_API_URL,
    ApiClient,
    ClientError,
    SseEvent,
    UsageProblem,
    problem_lines,
    resolve_key,
)
from services.client.render import (
    FLOW_COLUMNS,
    body_preview,
    clean,
    console,
    flow_event_line,
    flow_row,
    has_controls,
    headers_table,
    key_value_lines,
    out_json,
    out_json_line,
    status_text,
    table,
    text,
    when,
)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class App:
    """What every command needs: the API client (made on first use, so that ``--help``
    needs no key) and a console."""

    api_url: str
    key_file: Path | None
    _api: ApiClient | None = field(default=None, repr=False)

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            self._api = ApiClient(self.api_url, resolve_key(self.key_file))
        return self._api


pass_app = click.make_pass_decorator(App)
out = console()
note = console(stderr=True)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="raw JSON from the API")(f)


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments as a merge patch: a value that parses as JSON is that JSON
    (``5``, ``true``, ``null``, ``["a"]``), anything else is the string itself."""
    patch: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="KEY=VALUE")
        try:
            patch[key] = json.loads(raw)
        except ValueError:
            patch[key] = raw
    return patch


def read_json_arg(value: str | None, path: str | None, what: str) -> Any:
    """A JSON document from an argument, a file, or stdin (``-f -``)."""
    if (value is None) == (path is None):
        raise click.UsageError(f"give the {what} as an argument or with -f FILE (- for stdin)")
    if path is not None:
        try:
            value = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise click.UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(value or "")
    except ValueError as exc:
        raise click.UsageError(f"the {what} is not JSON: {exc}") from None


def rollout(doc: dict[str, Any]) -> Text:
    """``applied: a; pending: b; rejected: c (why)`` of a config or policy write."""
    rejected = doc.get("rejected") or []
    parts = [
        f"applied: {', '.join(map(clean, doc.get('applied') or [])) or '-'}",
        f"pending: {', '.join(map(clean, doc.get('pending') or [])) or '-'}",
    ]
    line = Text("; ".join(parts), style="dim")
    if rejected:
        names = ", ".join(
            f"{clean(r.get('id'))} ({clean(r.get('error'))})" if isinstance(r, dict) else clean(r)
            for r in rejected
        )
        line.append(f"; rejected: {names}", style="red")
    return line


# -- the group -------------------------------------------------------------------------------
@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Talk to the proxyfleet management API (FLEET_API_URL, FLEET_API_KEY).",
)
@click.option(
    "--api-url",
    envvar="FLEET_API_URL",
    default=DEFAULT_API_URL,
    show_default=True,
    help="the API's base URL [env FLEET_API_URL]",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="read the API key from this file (default: FLEET_API_KEY, else $FLEET_DATA_DIR/api-key)",
)
@click.pass_context
def cli(ctx: click.Context, api_url: str, key_file: Path | None) -> None:
    ctx.obj = App(api_url, key_file)
    ctx.call_on_close(lambda: ctx.obj._api.close() if ctx.obj._api else None)


# -- fleet -----------------------------------------------------------------------------------
@cli.command()
@click.option("--replica", help="one replica only")
@json_option
@pass_app
def status(app: App, replica: str | None, as_json: bool) -> None:
    """The fleet's state and each replica."""
    doc = app.api.get("/api/proxy/status", replica=replica)
    if as_json:
        return out_json(doc)
    t = doc.get("totals") or {}
    out.print(
        text(
            f"fleet {doc.get('state')}: {t.get('running')}/{t.get('replicas')} replicas running, "
            f"{t.get('active_connections')} connections, {t.get('active_flows')} active flows, "
            f"{t.get('flows_total')} flows",
            "bold",
        )
    )
    rows = []
    for r in doc.get("replicas") or []:
        errors = "; ".join(clean(e) for e in (r.get("config_error"), r.get("policy_error")) if e)
        rows.append(
            [
                r.get("id"),
                r.get("state"),
                r.get("listen"),
                r.get("mode"),
                r.get("active_connections"),
                r.get("active_flows"),
                r.get("flows_total"),
                f"{r.get('uptime_s', 0):.0f}s",
                r.get("config_revision"),
                r.get("policy_revision"),
                r.get("intercepts_pending"),
                Text(errors, style="red"),
            ]
        )
    cols = ("id", "state", "listen", "mode", "conns", "active", "flows", "uptime", "config")
    out.print(table((*cols, "policy", "held", "errors"), rows))


def _lifecycle(app: App, verb: str, body: dict[str, Any], as_json: bool) -> int:
    doc = app.api.request("POST", f"/api/proxy/{verb}", json_body=body or None).json()
    if as_json:
        out_json(doc)
    else:
        for r in doc.get("replicas") or []:
            line = text(f"{r.get('id')}: {r.get('state')}", "" if r.get("ok") else "red")
            if r.get("aborted"):
                line.append(f" ({r['aborted']} flows cut at the deadline)")
            if not r.get("ok"):
                line.append(f" {clean(r.get('message'))} ({clean(r.get('code'))})")
            out.print(line)
    return 0 if doc.get("ok") else 1


@cli.command()
@click.option("--replica", help="one replica only (default: all)")
@json_option
@pass_app
def start(app: App, replica: str | None, as_json: bool) -> int:
    """Open the proxies' listeners."""
    return _lifecycle(app, "start", {"replica": replica} if replica else {}, as_json)


@cli.command()
@click.option("--replica", help="one replica only (default: all)")
@click.option("--deadline", type=float, help="seconds in-flight requests may finish (10)")
@json_option
@pass_app
def stop(app: App, replica: str | None, deadline: float | None, as_json: bool) -> int:
    """Gracefully close the proxies' listeners."""
    body: dict[str, Any] = {"replica": replica, "deadline": deadline}
    return _lifecycle(app, "stop", {k: v for k, v in body.items() if v is not None}, as_json)


# -- flows -----------------------------------------------------------------------------------
@cli.group()
def flows() -> None:
    """Recorded flows: list, show, follow, kill, replay, export."""


def flow_filters(f: F) -> F:
    options = [
        click.option("-q", "--query", "q", help="filter expression (~d example.com & ~c 500)"),
        click.option("--host", help="host, exact or *.example.com"),
        click.option("--method"),
        click.option("--status", type=int),
        click.option("--state", help="active, completed, error, killed"),
        click.option("--replica"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _filters(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw.pop(k) for k in ("q", "host", "method", "status", "state", "replica")}


@flows.command("ls")
@flow_filters
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="next_cursor of the previous page")
@json_option
@pass_app
def flows_ls(app: App, limit: int, cursor: str | None, as_json: bool, **kw: Any) -> None:
    """Flows, newest first."""
    doc = app.api.get("/api/flows", limit=limit, cursor=cursor, **_filters(kw))
    if as_json:
        return out_json(doc)
    items = doc.get("flows") or []
    out.print(table(FLOW_COLUMNS, [flow_row(f) for f in items]))
    count = doc.get("filtered_count")
    exact = "" if doc.get("filtered_count_exact", True) else "at least "
    footer = f"{len(items)} of {exact}{count} flows"
    if doc.get("partial"):
        footer += " (the scan ran out: more may match)"
    if doc.get("next_cursor"):
        footer += f"; next page: --cursor {doc['next_cursor']}"
    note.print(text(footer, "dim"))


@flows.command("show")
@click.argument("flow_id")
@click.option(
    "--body",
    "part",
    type=click.Choice(["request", "response"]),
    help="write that body's bytes to stdout instead",
)
@click.option("--decode", is_flag=True, help="undo gzip/deflate/br/zstd")
@json_option
@pass_app
def flows_show(app: App, flow_id: str, part: str | None, decode: bool, as_json: bool) -> None:
    """One flow: heads and bodies (or one body's raw bytes with --body)."""
    params = {"decode": "true"} if decode else None
    if part is not None:
        with app.api.stream(f"/api/flows/{flow_id}/{part}/body", params) as resp:
            problem = resp.headers.get("X-Flow-Decode-Error")
            if sys.stdout.isatty():  # bodies are capped at capture: read it whole, check it
                data = resp.read()
                if has_controls(data):
                    raise click.UsageError(
                        f"the {part} body has control bytes that would act on the terminal: "
                        "redirect it (> body.bin) or pipe it"
                    )
                sys.stdout.buffer.write(data)
            else:
                for chunk in resp.iter_bytes():
                    sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        if decode and problem:
            note.print(text(f"not decoded ({problem}): the bytes as recorded", "yellow"))
        return None
    doc = app.api.get(f"/api/flows/{flow_id}", **(params or {}))
    if as_json:
        return out_json(doc)
    req, resp_part = doc.get("request") or {}, doc.get("response") or {}
    head = text(f"{doc.get('method')} {doc.get('scheme')}://{doc.get('host')}:{doc.get('port')}")
    head.append(clean(doc.get("path")))
    head.stylize("bold")
    out.print(head)
    timings = doc.get("timings") or {}
    start_t, end_t = timings.get("start"), timings.get("end")
    took = f"{(end_t - start_t) * 1000:.0f}ms" if start_t and end_t else ""
    facts = [
        ("id", doc.get("id")),
        ("state", doc.get("state")),
        ("status", f"{resp_part.get('status') or ''} {resp_part.get('reason') or ''}".strip()),
        ("replica", doc.get("replica")),
        ("started", when(start_t, full=True)),
        ("duration", took),
    ]
    for name in ("error", "tags", "replay_of"):
        if doc.get(name):
            facts.append((name, doc[name]))
    matched = (doc.get("policy") or {}).get("matched") or []
    if matched:
        facts.append(("rules", ", ".join(f"{m.get('rule')} ({m.get('action')})" for m in matched)))
    out.print(key_value_lines(facts))
    for label, part_doc in (("request", req), ("response", resp_part)):
        if not part_doc:
            continue
        size_note = f"{part_doc.get('size', 0)} bytes" + (
            ", truncated" if part_doc.get("truncated") else ""
        )
        if part_doc.get("decoded"):
            size_note += f", decoded from {part_doc.get('content_encoding')}"
        elif part_doc.get("decode_error"):
            size_note += f", not decoded: {part_doc.get('decode_error')}"
        out.print()
        out.print(text(f"── {label} ({size_note})", "bold"))
        out.print(headers_table(part_doc.get("headers")))
        preview = body_preview(part_doc)
        if preview is not None:
            out.print()
            out.print(preview)
    return None


@flows.command("tail")
@flow_filters
@click.option("--last-event-id", help="resume after this stream id")
@json_option
@pass_app
def flows_tail(app: App, last_event_id: str | None, as_json: bool, **kw: Any) -> None:
    """Follow flow events live (resumes by itself after a disconnect)."""
    _follow(
        app, "/api/flows/stream", _filters(kw), last_event_id, "flows", as_json, flow_event_line
    )


def _follow(
    app: App,
    path: str,
    params: dict[str, Any],
    last_event_id: str | None,
    what: str,
    as_json: bool,
    line: Callable[[dict[str, Any]], Text],
) -> None:
    """Print a live stream's events as they come (``line`` for people, JSON lines for
    scripts), resuming after a disconnect, until interrupted."""
    for event in app.api.events(path, params, last_event_id, on_reconnect=_reconnecting):
        if event.event == "connected":
            _connected(event, what)
            continue
        data = event.json()
        if not isinstance(data, dict):
            continue
        if as_json:
            out_json_line(data)
        else:
            out.print(line(data), soft_wrap=True)
        sys.stdout.flush()


def _reconnecting(reason: str, last: str | None) -> None:
    after = f", resuming after {last}" if last else ""
    note.print(text(f"reconnecting ({reason}){after}", "dim"))


def _connected(event: SseEvent, what: str) -> None:
    """Say on stderr that the stream is followed (once per connection)."""
    data = event.json()
    resumed = data.get("resumed_after") if isinstance(data, dict) else None
    note.print(text(f"following {what}" + (f" after {resumed}" if resumed else ""), "dim"))
    if isinstance(data, dict) and data.get("gap"):
        note.print(
            text(
                f"some events are gone from the stream: resuming at {data.get('resumes_at')}",
                "yellow",
            )
        )


@flows.command("kill")
@click.argument("flow_id")
@json_option
@pass_app
def flows_kill(app: App, flow_id: str, as_json: bool) -> None:
    """Kill an active flow's connection."""
    doc = app.api.request("DELETE", f"/api/flows/{flow_id}").json()
    if as_json:
        return out_json(doc)
    out.print(text(f"killed flow {flow_id}"))
    return None


@flows.command("replay")
@click.argument("flow_id")
@click.option("--replica", help="the replica to send it from")
@json_option
@pass_app
def flows_replay(app: App, flow_id: str, replica: str | None, as_json: bool) -> None:
    """Send a recorded request again (a new flow)."""
    body = {"replica": replica} if replica else None
    doc = app.api.request("POST", f"/api/flows/{flow_id}/replay", json_body=body).json()
    if as_json:
        return out_json(doc)
    out.print(text(f"replayed {flow_id} as {doc.get('flow_id')} on {doc.get('replica')}"))
    return None


@flows.command("har")
@flow_filters
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True, help="file"
)
@pass_app
def flows_har(app: App, output: Path, **kw: Any) -> None:
    """Export the matching flows as a HAR 1.2 file."""
    written = 0
    progress = Progress(
        TextColumn("[bold]flows.har"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=note,
        transient=True,
    )
    timeout = httpx.Timeout(10.0, read=300.0)
    try:
        with (
            app.api.stream("/api/flows/har", _filters(kw), timeout=timeout) as resp,
            output.open("wb") as f,
            progress,
        ):
            task = progress.add_task("export", total=None)
            for chunk in resp.iter_bytes():
                f.write(chunk)
                written += len(chunk)
                progress.update(task, completed=written)
    except (ClientError, KeyboardInterrupt, OSError):
        output.unlink(missing_ok=True)
        raise
    try:
        entries: Any = len(json.loads(output.read_bytes())["log"]["entries"])
    except (ValueError, KeyError, TypeError):
        entries = "?"
    out.print(text(f"wrote {entries} entries ({written} bytes) to {output}"))


# -- config ----------------------------------------------------------------------------------
@cli.group()
def config() -> None:
    """The runtime config: get, set, edit, history, diff, rollback."""


def _write_result(doc: dict[str, Any], what: str = "config") -> None:
    out.print(text(f"{what} revision {doc.get('revision')}"))
    out.print(rollout(doc))


@config.command("get")
@click.argument("field_name", required=False, metavar="[FIELD]")
@json_option
@pass_app
def config_get(app: App, field_name: str | None, as_json: bool) -> int:
    """The config document (or one field)."""
    doc = app.api.get("/api/config")
    if field_name is not None:
        cfg = doc.get("config") or {}
        if field_name not in cfg:
            raise click.UsageError(f"no config field {field_name!r} (fields: {', '.join(cfg)})")
        out_json(cfg[field_name])
        return 0
    if as_json:
        out_json(doc)
        return 0
    note.print(text(f"revision {doc.get('revision')}", "dim"))
    out_json(doc.get("config"))
    return 0


@config.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@json_option
@pass_app
def config_set(app: App, assignments: tuple[str, ...], as_json: bool) -> None:
    """Change fields (values are JSON when they parse: 5, true, null, ["a"]; else text).
    null returns a field to its default."""
    patch = parse_assignments(assignments)
    resp = app.api.request(
        "PATCH",
        "/api/config",
        json_body=patch,
        headers={"Content-Type": "application/merge-patch+json"},
    )
    doc = resp.json()
    if as_json:
        return out_json(doc)
    _write_result(doc)
    return None


@config.command("edit")
@pass_app
def config_edit(app: App) -> int:
    """Edit the config in $EDITOR; saved with If-Match (an invalid one is never written)."""
    resp = app.api.request("GET", "/api/config")
    current = resp.json()
    etag = resp.headers.get("ETag") or f'"{current.get("revision")}"'
    draft = json.dumps(current.get("config"), indent=2) + "\n"
    while True:
        edited = click.edit(draft, extension=".json", require_save=True)
        if edited is None:
            note.print(text("not saved: nothing changed"))
            return 0
        try:
            doc = json.loads(edited)
            error: ClientError | None = None
        except ValueError as exc:
            error = ClientError(f"not JSON: {exc}", "INVALID_JSON")
        if error is None:
            if doc == current.get("config"):
                note.print(text("no changes"))
                return 0
            try:
                written = app.api.request(
                    "PUT", "/api/config", json_body=doc, headers={"If-Match": etag}
                ).json()
            except ClientError as exc:
                error = exc
            else:
                _write_result(written)
                return 0
        for line in problem_lines(error):
            note.print(text(line, "red"))
        if error.status == 412:
            note.print(text("the config changed meanwhile: run config edit again"))
            return 1
        if not (sys.stdin.isatty() and click.confirm("edit again?", default=True, err=True)):
            note.print(text("not saved: the config is unchanged"))
            return 1
        draft = edited


@config.command("history")
@click.option("--limit", type=int, help="this many revisions")
@json_option
@pass_app
def config_history(app: App, limit: int | None, as_json: bool) -> None:
    """Past revisions, with the fields each changed."""
    doc = app.api.get("/api/config/history", limit=limit)
    if as_json:
        return out_json(doc)
    revisions = sorted(doc.get("revisions") or [], key=lambda r: r.get("revision", 0))
    rows = []
    before: dict[str, Any] | None = None
    for r in revisions:
        cfg = r.get("config") if isinstance(r.get("config"), dict) else None
        if cfg is None:
            changes = ""
        elif before is None:
            changes = ""
        else:
            changes = ", ".join(k for k in cfg if cfg.get(k) != before.get(k))
        before = cfg if cfg is not None else before
        rows.append([r.get("revision"), r.get("time"), r.get("operation"), changes])
    out.print(table(("revision", "time", "operation", "changed"), reversed(rows)))
    return None


@config.command("diff")
@json_option
@pass_app
def config_diff(app: App, as_json: bool) -> None:
    """The saved config against what each replica runs."""
    doc = app.api.get("/api/config/compare")
    if as_json:
        return out_json(doc)
    sync = "in sync" if doc.get("in_sync") else "NOT in sync"
    out.print(text(f"saved revision {doc.get('revision')}: {sync}", "bold"))
    rows = []
    for r in doc.get("replicas") or []:
        diffs = "; ".join(
            f"{d.get('field')}: {json.dumps(d.get('saved'))} → {json.dumps(d.get('running'))}"
            for d in r.get("differences") or []
        )
        rows.append([r.get("id"), r.get("revision"), r.get("state"), r.get("error"), diffs])
    out.print(table(("replica", "revision", "state", "error", "differences"), rows))
    return None


@config.command("rollback")
@click.argument("revision", type=int)
@json_option
@pass_app
def config_rollback(app: App, revision: int, as_json: bool) -> None:
    """Write revision REV's document again, as a new revision."""
    doc = app.api.request("POST", "/api/config/rollback", json_body={"revision": revision}).json()
    if as_json:
        return out_json(doc)
    _write_result(doc)
    return None


# -- rules -----------------------------------------------------------------------------------
@cli.group()
def rules() -> None:
    """The rules policy, one rule at a time."""


def _action_summary(action: dict[str, Any]) -> str:
    kind = str(action.get("type"))
    extra = {k: v for k, v in action.items() if k != "type" and v not in (None, "", [])}
    return kind + (" " + json.dumps(extra, ensure_ascii=True) if extra else "")


@rules.command("ls")
@json_option
@pass_app
def rules_ls(app: App, as_json: bool) -> None:
    """Every rule, in document order."""
    doc = app.api.get("/api/policy/rules")
    if as_json:
        return out_json(doc)
    rows = []
    for r in doc.get("rules") or []:
        match = r.get("match") or {}
        rows.append(
            [
                r.get("id"),
                "yes" if r.get("enabled", True) else "no",
                r.get("priority"),
                match.get("phase"),
                match.get("filter"),
                _action_summary(r.get("action") or {}),
                r.get("description"),
            ]
        )
    cols = ("id", "enabled", "priority", "phase", "filter", "action", "description")
    out.print(table(cols, rows))
    note.print(text(f"policy revision {doc.get('revision')}", "dim"))
    return None


@rules.command("add")
@click.argument("rule", required=False)
@click.option("-f", "--file", "path", help="read the rule from a file (- for stdin)")
@click.option("--before", help="insert in front of this rule (default: at the end)")
@json_option
@pass_app
def rules_add(
    app: App, rule: str | None, path: str | None, before: str | None, as_json: bool
) -> None:
    """Add a rule (JSON: {"match": {"filter": ...}, "action": {"type": ...}})."""
    body = read_json_arg(rule, path, "rule")
    resp = app.api.request("POST", "/api/policy/rules", params={"before": before}, json_body=body)
    doc = resp.json()
    if as_json:
        return out_json(doc)
    out.print(text(f"added rule {(doc.get('rule') or {}).get('id')}"))
    _write_result(doc, "policy")
    return None


@rules.command("rm")
@click.argument("rule_id")
@pass_app
def rules_rm(app: App, rule_id: str) -> None:
    """Remove a rule."""
    resp = app.api.request("DELETE", f"/api/policy/rules/{rule_id}")
    revision = resp.headers.get("ETag", "?").strip('"')
    out.print(text(f"removed rule {rule_id} (policy revision {revision})"))


def _toggle(app: App, rule_id: str, enabled: bool, as_json: bool) -> None:
    resp = app.api.request("GET", f"/api/policy/rules/{rule_id}")
    rule = resp.json()
    word = "enabled" if enabled else "disabled"
    if rule.get("enabled", True) == enabled and not as_json:
        out.print(text(f"rule {rule_id} is already {word}"))
        return
    rule["enabled"] = enabled
    headers = {"If-Match": resp.headers["ETag"]} if "ETag" in resp.headers else None
    doc = app.api.request(
        "PUT", f"/api/policy/rules/{rule_id}", json_body=rule, headers=headers
    ).json()
    if as_json:
        return out_json(doc)
    out.print(text(f"rule {rule_id} {word}"))
    _write_result(doc, "policy")


@rules.command("enable")
@click.argument("rule_id")
@json_option
@pass_app
def rules_enable(app: App, rule_id: str, as_json: bool) -> None:
    """Enable a rule."""
    _toggle(app, rule_id, True, as_json)


@rules.command("disable")
@click.argument("rule_id")
@json_option
@pass_app
def rules_disable(app: App, rule_id: str, as_json: bool) -> None:
    """Disable a rule (it stays in the policy)."""
    _toggle(app, rule_id, False, as_json)


# -- approvals -------------------------------------------------------------------------------
@cli.group()
def approvals() -> None:
    """Exchanges held by intercept rules: list, watch, decide."""


def _pending_rows(pending: list[dict[str, Any]]) -> list[list[object]]:
    rows = []
    for p in pending:
        req = p.get("request") or {}
        resp = p.get("response") or {}
        rows.append(
            [
                p.get("id"),
                p.get("rule"),
                p.get("phase"),
                req.get("method"),
                req.get("url"),
                resp.get("status", ""),
                when(p.get("expires_at")),
                p.get("replica"),
            ]
        )
    return rows


_PENDING_COLUMNS = ("id", "rule", "phase", "method", "url", "status", "expires", "replica")


@approvals.command("ls")
@json_option
@pass_app
def approvals_ls(app: App, as_json: bool) -> None:
    """What is held now, oldest first."""
    doc = app.api.get("/api/approvals/pending/list")
    if as_json:
        return out_json(doc)
    out.print(table(_PENDING_COLUMNS, _pending_rows(doc.get("pending") or [])))
    if doc.get("missing"):
        note.print(text(f"not answering: {', '.join(doc['missing'])}", "yellow"))
    return None


@approvals.command("watch")
@json_option
@pass_app
def approvals_watch(app: App, as_json: bool) -> None:
    """Follow held exchanges live: a snapshot, then each one held or resolved."""
    for event in app.api.events("/api/approvals/pending", on_reconnect=_reconnecting):
        if event.event == "snapshot":
            note.print(text("following held exchanges", "dim"))
        data = event.json()
        if not isinstance(data, dict):
            continue
        if as_json:
            out_json_line(data)
            continue
        kind = event.event
        if kind == "snapshot":
            out.print(table(_PENDING_COLUMNS, _pending_rows(data.get("pending") or [])))
        elif kind == "pending_created":
            p = data.get("approval") or {}
            req = p.get("request") or {}
            line = text(f"held     {p.get('id')} ", "yellow")
            what = (p.get("rule"), p.get("phase"), req.get("method"), req.get("url"))
            line.append(" ".join(map(clean, what)))
            out.print(line, soft_wrap=True)
        elif kind == "pending_resolved":
            out.print(text(f"resolved {data.get('id')} {data.get('decision')} by {data.get('by')}"))
        elif kind == "pending_timeout":
            out.print(text(f"timeout  {data.get('id')} {data.get('on_timeout')}", "red"))
        sys.stdout.flush()


def _decide(app: App, approval_id: str, verb: str, body: Any, as_json: bool) -> None:
    doc = app.api.request(
        "POST", f"/api/approvals/pending/{approval_id}/{verb}", json_body=body
    ).json()
    if as_json:
        return out_json(doc)
    line = text(f"{doc.get('decision')}: {doc.get('id')} (replica {doc.get('replica')})")
    cached = doc.get("cached")
    if isinstance(cached, dict):
        line.append(f"; cached until {when(cached.get('expires_at'), full=True)}")
    out.print(line)
    return None


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--ttl", type=float, help="seconds the approval is cached (default: the API's)")
@json_option
@pass_app
def approvals_approve(app: App, approval_id: str, ttl: float | None, as_json: bool) -> None:
    """Let it pass and cache the approval (same rule, method, URL)."""
    _decide(app, approval_id, "approve", {"ttl_s": ttl} if ttl is not None else None, as_json)


@approvals.command("allow-once")
@click.argument("approval_id")
@json_option
@pass_app
def approvals_allow_once(app: App, approval_id: str, as_json: bool) -> None:
    """Let it pass; nothing cached."""
    _decide(app, approval_id, "allow-once", None, as_json)


@approvals.command("deny")
@click.argument("approval_id")
@click.option("--status", type=int, help="the status the client gets")
@click.option("--body", help="the body the client gets")
@json_option
@pass_app
def approvals_deny(
    app: App, approval_id: str, status: int | None, body: str | None, as_json: bool
) -> None:
    """Refuse it."""
    doc = {k: v for k, v in (("status", status), ("body", body)) if v is not None}
    _decide(app, approval_id, "deny", doc or None, as_json)


@approvals.command("modify")
@click.argument("approval_id")
@click.argument("edit", required=False)
@click.option("-f", "--file", "path", help="read the edit from a file (- for stdin)")
@json_option
@pass_app
def approvals_modify(
    app: App, approval_id: str, edit: str | None, path: str | None, as_json: bool
) -> None:
    """Let it pass changed: {"request": {...}} or {"response": {...}}."""
    _decide(app, approval_id, "modify", read_json_arg(edit, path, "edit"), as_json)


@approvals.command("cached")
@json_option
@pass_app
def approvals_cached(app: App, as_json: bool) -> None:
    """Approvals in force (what `approve` cached), oldest first."""
    doc = app.api.get("/api/approvals/cached")
    if as_json:
        return out_json(doc)
    rows = [
        [c.get("rule"), c.get("method"), c.get("url"), c.get("by"), when(c.get("expires_at"))]
        for c in doc.get("cached") or []
    ]
    out.print(table(("rule", "method", "url", "by", "expires"), rows))
    return None


@approvals.command("forget")
@click.option("--rule", help="the rule id of the entry")
@click.option("--method", help="its method")
@click.option("--url", help="its URL")
@click.option("--all", "everything", is_flag=True, help="forget every cached approval")
@pass_app
def approvals_forget(
    app: App, rule: str | None, method: str | None, url: str | None, everything: bool
) -> None:
    """Forget one cached approval (--rule, --method, --url), or --all of them."""
    if everything == bool(rule or method or url):
        raise UsageProblem("give --all, or --rule, --method and --url of one entry")
    if everything:
        app.api.request("DELETE", "/api/approvals/cached")
        out.print("forgot every cached approval")
        return
    if not (rule and method and url):
        raise UsageProblem("one entry needs all of --rule, --method and --url")
    params = {"rule": rule, "method": method, "url": url}
    app.api.request("DELETE", "/api/approvals/cached/entry", params=params)
    out.print(text(f"forgot {rule} {method} {url}"))


# -- decision log ------------------------------------------------------------------------------
@cli.command("decisions")
@click.option("--range", "time_range", help="5m, 1h (the API's default), 24h, 7d, all")
@click.option("--rule", help="flows this rule (by id) matched")
@click.option(
    "--decision",
    type=click.Choice(["block", "respond", "allow", "intercept", "modify"]),
    help="flows with this decision",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--before", help="next_cursor of the previous page")
@json_option
@pass_app
def decisions(app: App, as_json: bool, **kw: Any) -> None:
    """The decision log: flows a policy rule matched, newest first."""
    doc = app.api.get("/api/logs/decisions", **kw)
    if as_json:
        return out_json(doc)
    rows = [
        [
            when(d.get("time")),
            d.get("decision"),
            " ".join(str(r.get("rule")) for r in d.get("rules") or [] if isinstance(r, dict)),
            d.get("method"),
            status_text(d.get("status")),
            d.get("url"),
            d.get("flow_id"),
        ]
        for d in doc.get("entries") or []
    ]
    out.print(table(("time", "decision", "rules", "method", "status", "url", "id"), rows))
    if doc.get("next_cursor") is not None:
        note.print(text(f"next page: --before {doc['next_cursor']}", "dim"))
    return None


# -- events ----------------------------------------------------------------------------------
@cli.group()
def events() -> None:
    """The system event log."""


def _event_filters(f: F) -> F:
    f = click.option("--source", help="a replica id, a store id, or api")(f)
    return click.option("--type", "type_", help="replica_started, audit, ...")(f)


def _event_row(e: dict[str, Any]) -> list[object]:
    data = json.dumps(e.get("data"), ensure_ascii=True, separators=(",", ":"))
    severity = str(e.get("severity"))
    style = {"warning": "yellow", "error": "red"}.get(severity, "")
    return [
        when(e.get("time")),
        text(severity, style),
        e.get("type"),
        e.get("source"),
        data if len(data) <= 120 else data[:119] + "…",
        e.get("seq"),
    ]


_EVENT_COLUMNS = ("time", "severity", "type", "source", "data", "seq")


@events.command("ls")
@_event_filters
@click.option("--severity", type=click.Choice(["info", "warning", "error"]), help="at least")
@click.option("--range", "time_range", help="5m, 1h, 24h, 7d, all")
@click.option("--since", help="ISO-8601 or epoch seconds")
@click.option("--until", help="ISO-8601 or epoch seconds")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="next_cursor of the previous page")
@json_option
@pass_app
def events_ls(app: App, type_: str | None, as_json: bool, **kw: Any) -> None:
    """System events, newest first."""
    doc = app.api.get("/api/events", type=type_, **kw)
    if as_json:
        return out_json(doc)
    out.print(table(_EVENT_COLUMNS, [_event_row(e) for e in doc.get("events") or []]))
    if doc.get("next_cursor") is not None:
        note.print(text(f"next page: --cursor {doc['next_cursor']}", "dim"))
    return None


@events.command("tail")
@_event_filters
@click.option("--last-event-id", help="resume after this stream sequence")
@json_option
@pass_app
def events_tail(
    app: App, type_: str | None, source: str | None, last_event_id: str | None, as_json: bool
) -> None:
    """Follow system events live."""
    params = {"type": type_, "source": source}
    _follow(app, "/api/events/stream", params, last_event_id, "events", as_json, _event_line)


def _event_line(data: dict[str, Any]) -> Text:
    return Text(" ").join(c if isinstance(c, Text) else text(c) for c in _event_row(data))


# -- keys --------------------------------------------------------------------------------------
@cli.group()
def keys() -> None:
    """API keys: list, create, revoke."""


@keys.command("ls")
@json_option
@pass_app
def keys_ls(app: App, as_json: bool) -> None:
    """Every key the API honours (never a secret)."""
    doc = app.api.get("/api/keys")
    if as_json:
        return out_json(doc)
    rows = [
        [
            k.get("id"),
            k.get("scope"),
            k.get("source"),
            k.get("name"),
            when(k.get("created"), full=True),
            k.get("created_by"),
            when(k.get("last_used"), full=True),
        ]
        for k in doc.get("keys") or []
    ]
    cols = ("id", "scope", "source", "name", "created", "created by", "last used")
    out.print(table(cols, rows))
    return None


@keys.command("create")
@click.option("--scope", type=click.Choice(["read", "admin"]), required=True)
@click.option("--name", default="", help="what it is for")
@json_option
@pass_app
def keys_create(app: App, scope: str, name: str, as_json: bool) -> None:
    """Make a key; its secret is printed this once."""
    doc = app.api.request("POST", "/api/keys", json_body={"scope": scope, "name": name}).json()
    if as_json:
        return out_json(doc)
    note.print(text(f"key {doc.get('id')} ({doc.get('scope')}) created; its secret, shown once:"))
    sys.stdout.write(str(doc.get("secret")) + "\n")
    return None


@keys.command("revoke")
@click.argument("key_id")
@pass_app
def keys_revoke(app: App, key_id: str) -> None:
    """Revoke a runtime key."""
    app.api.request("DELETE", f"/api/keys/{key_id}")
    out.print(text(f"revoked key {key_id}"))


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """Run one client command; the exit code (see the module's docstring)."""
    try:
        rv = cli.main(args=argv, prog_name="proxyfleet", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Ctrl-C in tail, watch, edit
            return 130
        print("aborted", file=sys.stderr)
        return 1
    except UsageProblem as exc:
        print(f"error: {clean(exc)}", file=sys.stderr)
        return 2
    except ClientError as exc:
        for line in problem_lines(exc):
            print(clean(line), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # | head
        sys.stderr.close()
        return 0
    return rv if isinstance(rv, int) else 0
