"""The README documents every setting (a FLEET_ variable per field)."""

from __future__ import annotations

from pathlib import Path

from libs.common.settings import ApiSettings, ProxySettings, StoreSettings
from services.up import UpSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_has_a_readme_row() -> None:
    names = set().union(
        *(c.model_fields for c in (ProxySettings, StoreSettings, ApiSettings, UpSettings))
    )
    missing = [n for n in sorted(names) if f"| `FLEET_{n.upper()}` |" not in README]
    assert not missing, f"settings missing from the README table: {missing}"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("\n## ")[0]
    assert "make run" in head and "make test" in head
