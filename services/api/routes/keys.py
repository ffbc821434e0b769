"""``/api/keys``: API keys made and revoked at runtime (see ``services.api.runtime_keys``).

``GET`` lists every key the API honours (ids, scopes, where each comes from, when it was
made and last used; never a secret, never a digest). ``POST`` makes a key and answers its
secret once. ``DELETE`` revokes a runtime key: refused at once by this replica, within a
second by the others. Keys from ``FLEET_API_KEYS`` or the generated key file are listed
but cannot be revoked here (``KEY_STATIC``): they live in the deployment's settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from services.api import audit
from services.api.auth import KeyRing
from services.api.deps import CallerDep, KeysDep
from services.api.errors import ApiError, problem_responses
from services.api.keyshare import publish_key_digests
from services.api.runtime_keys import MAX_RUNTIME_KEYS, RuntimeKey

router = APIRouter(prefix="/keys", tags=["keys"])

KeyId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the key's id")]


class NewKey(BaseModel):
    """A key to make."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["read", "admin"]
    name: str = Field(
        default="", max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$", description="what it is for"
    )


class KeyInfo(BaseModel):
    id: str
    scope: Literal["read", "admin"]
    source: Literal["runtime", "settings"]
    name: str = ""
    created: float | None = None
    created_by: str | None = None
    last_used: float | None = None


class KeyList(BaseModel):
    keys: list[KeyInfo]


class CreatedKey(KeyInfo):
    secret: str = Field(description="the key itself: shown this once, never stored")


@router.get(
    "",
    response_model=KeyList,
    summary="List the API keys (never their secrets)",
    responses=problem_responses(401, 403, 503),
)
async def list_keys(request: Request, keys: KeysDep) -> dict[str, Any]:
    ring: KeyRing = request.app.state.keyring
    used = await keys.used()
    out: list[dict[str, Any]] = [
        {"id": k.id, "scope": k.scope, "source": "settings", "last_used": used.get(k.id)}
        for k in ring.static
    ]
    for key in sorted(keys.keys.values(), key=lambda k: k.created):
        out.append(_info(key) | {"last_used": used.get(key.id)})
    return {"keys": out}


def _info(key: RuntimeKey) -> dict[str, Any]:
    """What the API shows of a runtime key (never its digest)."""
    return {
        "id": key.id,
        "scope": key.scope,
        "source": "runtime",
        "name": key.name,
        "created": key.created,
        "created_by": key.created_by,
    }


@router.post(
    "",
    status_code=201,
    response_model=CreatedKey,
    summary="Make an API key (its secret is answered once)",
    responses=problem_responses(401, 403, 409, 422, 503),
    openapi_extra=audit.action("key.create"),
)
async def create_key(
    request: Request, body: NewKey, keys: KeysDep, caller: CallerDep, response: Response
) -> dict[str, Any]:
    if len(keys.keys) >= MAX_RUNTIME_KEYS:
        raise ApiError(409, "KEY_LIMIT", f"at most {MAX_RUNTIME_KEYS} runtime keys; revoke some")
    key, secret = await keys.create(body.scope, body.name, caller.key_id)
    await publish_key_digests(keys.bus, [key.spec()])  # proxies mask it in recorded traffic
    audit.note(request, "key.create", key=key.id, scope=key.scope)
    response.headers["Cache-Control"] = "no-store"
    return _info(key) | {"secret": secret}


@router.delete(
    "/{key_id}",
    status_code=204,
    summary="Revoke a runtime API key (refused at once)",
    responses=problem_responses(401, 403, 404, 409, 422, 503),
    openapi_extra=audit.action("key.revoke"),
)
async def revoke_key(request: Request, key_id: KeyId, keys: KeysDep) -> Response:
    ring: KeyRing = request.app.state.keyring
    audit.note(request, "key.revoke", key=key_id)
    if any(k.id == key_id for k in ring.static):
        raise ApiError(
            409,
            "KEY_STATIC",
            f"key {key_id!r} comes from the settings (FLEET_API_KEYS or the key file): "
            "remove it there",
        )
    if not await keys.revoke(key_id):
        raise ApiError(404, "KEY_NOT_FOUND", f"no runtime key {key_id!r}")
    return Response(status_code=204)
