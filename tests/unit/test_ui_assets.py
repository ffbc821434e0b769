"""The web UI's files: all of them travel in the wheel the container image installs, and
none of them loads anything from another site (no CDN at run time)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import fastapi_swagger

from services.api.app import SWAGGER_ASSETS
from services.api.ui import routes

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "services" / "api" / "ui"


def _ui_files() -> list[Path]:
    return [p for p in UI.rglob("*") if p.is_file() and p.suffix in (".html", ".js", ".css")]


def test_every_ui_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["services.api.ui"]
    covered = {p for g in globs for p in UI.glob(g)}
    files = set(_ui_files())
    assert files, "no UI files found"
    assert files <= covered, sorted(str(p.relative_to(UI)) for p in files - covered)


EXTERNAL = re.compile(
    r"""(src|href)\s*=\s*["']?(https?:)?//|\burl\(\s*["']?(https?:)?//|\bimport\b[^;]*["'](https?:)?//"""
)


def test_no_asset_comes_from_another_site() -> None:
    for sample in (  # what the check must catch
        '<script src="https://cdn.example/htmx.js">',
        "<link href=//fonts.example/css>",
        "background: url('https://img.example/x.png')",
        'import { x } from "https://esm.example/x.js";',
    ):
        assert EXTERNAL.search(sample), sample
    for path in _ui_files():
        assert not EXTERNAL.search(path.read_text()), f"{path.relative_to(UI)} loads from elsewhere"


def test_every_view_has_its_module_and_swagger_ships_in_its_wheel() -> None:
    js = UI / "static" / "js"
    for view in (*routes.VIEWS, "flow", "docs"):
        assert (js / f"{view}.js").is_file(), view
    assert SWAGGER_ASSETS.parent == Path(fastapi_swagger.__file__).parent
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert (SWAGGER_ASSETS / name).stat().st_size > 10_000, name
