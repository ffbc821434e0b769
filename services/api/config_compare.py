"""Saved config against what each replica runs (``GET /api/config/compare``).

A replica reports only the revision it runs (``config_revision`` in its heartbeat)
and, when it refused a newer one, why (``config_error``). The document behind that
revision is read from the config key's history in KV (the bucket keeps the last 64
writes), so the comparison is field by field without replicas sending their config.
Revision 0 is the defaults (nothing was ever applied). A revision that has left the
history is reported as such (``running: null``) rather than guessed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from libs.common.models import ReplicaStatus, RuntimeConfig
from services.api.config_store import ConfigStore
from services.api.fleet import RolloutState, classify

_FIELD_ORDER = {name: i for i, name in enumerate(RuntimeConfig.model_fields)}


class FieldDiff(BaseModel):
    """One field whose saved value is not the value a replica runs."""

    field: str
    saved: Any = Field(description="absent from a document: null")
    running: Any = Field(description="absent from a document: null")


class ReplicaConfig(BaseModel):
    """One replica's config against the saved document."""

    id: str
    revision: int = Field(description="the revision it runs (0: the defaults)")
    state: RolloutState = Field(
        description="applied: runs the saved revision (or a later one); rejected: refused "
        "it and kept its last good config; pending: has not reported it yet"
    )
    error: str | None = Field(description="why it refused the saved revision")
    running: dict[str, Any] | None = Field(
        description="the document it runs; null when that revision has left the history"
    )
    differences: list[FieldDiff] | None = Field(
        description="saved vs running, field by field (empty: identical); null when unknown"
    )


class ConfigComparison(BaseModel):
    """The saved document and, for every registered replica, what it runs."""

    revision: int = Field(description="the saved revision (the ETag)")
    config: RuntimeConfig
    in_sync: bool = Field(description="every replica runs exactly the saved document")
    replicas: list[ReplicaConfig]


def diff(saved: dict[str, Any], running: dict[str, Any]) -> list[FieldDiff]:
    """The fields whose values differ, in the config's field order."""
    names = sorted(saved.keys() | running.keys(), key=lambda n: (_FIELD_ORDER.get(n, 1 << 30), n))
    return [
        FieldDiff(field=n, saved=saved.get(n), running=running.get(n))
        for n in names
        if saved.get(n) != running.get(n)
    ]


def _document(raw: bytes | None) -> dict[str, Any] | None:
    """A stored document with its defaults filled in, as the replica that applied it runs it."""
    if raw is None:
        return None
    try:
        return RuntimeConfig.model_validate_json(raw).model_dump(mode="json")
    except ValidationError:
        return None  # no replica can run an invalid document; it reported another revision


async def compare(
    store: ConfigStore, saved: RuntimeConfig, revision: int, replicas: list[ReplicaStatus]
) -> ConfigComparison:
    """``saved`` (at ``revision``) against each replica's running revision."""
    saved_doc = saved.model_dump(mode="json")
    known: dict[int, dict[str, Any] | None] = {
        revision: saved_doc,
        0: RuntimeConfig.model_validate({}).model_dump(mode="json"),
    }
    wanted = sorted({r.config_revision for r in replicas} - known.keys())
    found = await asyncio.gather(*(store.raw_at(r) for r in wanted))
    for rev, raw in zip(wanted, found, strict=True):
        known[rev] = _document(raw)
    out: list[ReplicaConfig] = []
    for status in replicas:
        state, error = classify(status, revision)
        running = known.get(status.config_revision)
        out.append(
            ReplicaConfig(
                id=status.id,
                revision=status.config_revision,
                state=state,
                error=error,
                running=running,
                differences=None if running is None else diff(saved_doc, running),
            )
        )
    in_sync = all(r.differences == [] for r in out)
    return ConfigComparison(revision=revision, config=saved, in_sync=in_sync, replicas=out)
