"""The client commands' pure pieces: KEY=VALUE parsing, JSON arguments, inert rendering,
and how ``proxyfleet`` routes a command line."""

from __future__ import annotations

import io

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from services import cli as service_cli
from services.client import COMMANDS
from services.client.commands import cli, main, parse_assignments, read_json_arg
from services.client.render import (
    clean,
    flow_event_line,
    flow_row,
    has_controls,
    out_json,
    table,
    text,
)


def test_assignments_are_json_when_they_parse_else_text() -> None:
    assert parse_assignments(
        [
            "capture_body_limit=5000",
            "intercept_tls=false",
            'ignore_hosts=["*.a", "b"]',
            "redact_headers=null",
            "name=plain text",
            "url=http://x/?a=b",
            "empty=",
            " spaced =1.5",
        ]
    ) == {
        "capture_body_limit": 5000,
        "intercept_tls": False,
        "ignore_hosts": ["*.a", "b"],
        "redact_headers": None,
        "name": "plain text",
        "url": "http://x/?a=b",
        "empty": "",
        "spaced": 1.5,
    }


@pytest.mark.parametrize("bad", ["novalue", "=5", " =x"])
def test_an_assignment_without_a_key_is_a_usage_error(bad: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_assignments([bad])


def test_json_arguments_from_text_or_a_file() -> None:
    assert read_json_arg('{"a": 1}', None, "rule") == {"a": 1}
    with pytest.raises(click.UsageError, match="not JSON"):
        read_json_arg("{nope", None, "rule")
    with pytest.raises(click.UsageError, match="as an argument or with -f"):
        read_json_arg(None, None, "rule")
    with pytest.raises(click.UsageError, match="cannot read"):
        read_json_arg(None, "/nonexistent/rule.json", "rule")


# -- rendering ------------------------------------------------------------------------------
def test_control_and_invisible_characters_are_escaped() -> None:
    assert clean("a\x1b[31mb\x07c\x9bd\u202ee\u200bf\r\n") == (
        "a\\x1b[31mb\\x07c\\x9bd\\u202ee\\u200bf\\x0d\\x0a"
    )
    assert clean(None) == "" and clean("ünïcode ok") == "ünïcode ok"


def _render(renderable: object) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=True, color_system="truecolor").print(renderable)
    return buf.getvalue()


def test_markup_and_escapes_in_values_stay_inert_even_on_a_terminal() -> None:
    hostile = {
        "started_at": 0,
        "method": "GET",
        "status": 200,
        "host": "[link=http://evil]x[/link]",
        "path": "/[bold]b[/bold]\x1b]0;title\x07\x1b[2J",
        "response_size": 10,
        "duration_ms": 1.0,
        "replica": "r",
        "id": "0" * 24,
    }
    shown = _render(
        table(
            ["time", "method", "status", "host", "path", "a", "b", "c", "id"], [flow_row(hostile)]
        )
    )
    assert "[bold]b[/bold]" in shown and "[link=http://evil]x[/link]" in shown
    assert "\x1b]0;" not in shown and "\x1b[2J" not in shown and "\x07" not in shown
    assert "\\x1b]0;title\\x07\\x1b[2J" in shown
    assert "]8;" not in shown  # no hyperlink was made of the markup
    assert _render(text("[red]x[/red]")).count("[red]x[/red]") == 1


def test_a_live_flow_line_is_inert() -> None:
    line = flow_event_line(
        {
            "event": "completed",
            "id": "f1",
            "replica": "r\x1b[1m",
            "scheme": "http",
            "method": "GET",
            "host": "h\x1b]8;;http://evil\x07",
            "port": 8080,
            "path": "/[i]p[/i]",
            "timings": {"start": 0},
            "response": {"status": 200},
        }
    )
    shown = _render(line)
    assert "http://h\\x1b]8;;http://evil\\x07:8080/[i]p[/i]" in shown
    assert "\x1b]8;" not in shown and "r\\x1b[1m" in shown


def test_json_output_is_ascii(capsys: pytest.CaptureFixture[str]) -> None:
    out_json({"path": "/\x1b[2J\u202e\x9b"})
    written = capsys.readouterr().out
    assert written.isascii() and "\\u001b[2J\\u202e\\u009b" in written


def test_raw_bodies_with_terminal_controls_are_recognised() -> None:
    assert has_controls(b"a\x1b[31mb") and has_controls("x\x9by".encode()) and has_controls(b"\x00")
    assert not has_controls(b"plain text\r\n\twith tabs") and not has_controls("ünï".encode())


# -- routing --------------------------------------------------------------------------------
def test_the_command_list_matches_the_click_group() -> None:
    assert set(COMMANDS) == set(cli.commands)


@pytest.mark.parametrize(
    ("argv", "client"),
    [
        (["status"], True),
        (["flows", "ls"], True),
        (["--api-url", "http://x", "status"], True),
        (["--api-url=http://x", "status"], True),
        (["--key-file", "k", "keys", "ls"], True),
        (["up"], False),
        (["proxy"], False),
        (["nats-auth", "/tmp/x"], False),
        (["health", "api"], False),
        ([], False),
        (["--help"], False),
    ],
)
def test_client_commands_are_routed_by_their_first_word(argv: list[str], client: bool) -> None:
    assert service_cli._is_client(argv) is client


def test_help_needs_no_key_and_usage_errors_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_API_KEY", raising=False)
    monkeypatch.setenv("FLEET_DATA_DIR", "/nonexistent-proxyfleet")
    result = CliRunner().invoke(cli, ["flows", "--help"])
    assert result.exit_code == 0 and "tail" in result.output and "har" in result.output
    assert main(["flows", "ls", "--limit", "0"]) == 2
    assert main(["config", "set", "novalue"]) == 2
    assert main(["status"]) == 2  # no key anywhere: a usage problem, nothing sent
    assert service_cli.main(["keys", "--help"]) == 0


def test_service_usage_errors_keep_argparse_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        service_cli.main(["no-such-command"])
    assert exc.value.code == 2
