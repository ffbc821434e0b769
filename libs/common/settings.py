"""Process settings, read from ``FLEET_*`` environment variables.

Settings are built by ``load(...)`` when a service starts, never at import, so a
bad value becomes a one-line start-up error rather than an import crash. Every
field here has a working local default and a row in the README's settings table.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from libs.common.models import DEFAULT_REDACT_HEADERS, parse_destination

_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def _default_replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{secrets.token_hex(3)}"


_OFF = frozenset({"", "off", "none", "false", "no", "0", "disabled"})


def optional_listen(value: str) -> str:
    """A ``host:port`` to listen on, or ``""`` for none (``off``, ``none``, ``false``, ...)."""
    value = value.strip()
    if value.lower() in _OFF:
        return ""
    parse_hostport(value)
    return value


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` and ``:port`` allowed) into a pair."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


class CommonSettings(BaseSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server URL(s), comma-separated; may carry credentials "
        "(nats://user:password@host:port)",
        repr=False,  # holds the password once the credentials are folded in
    )
    nats_user: str | None = Field(None, description="NATS user (with a password)")
    nats_password: SecretStr | None = Field(None, description="NATS password (or token alone)")
    nats_password_file: Path | None = Field(
        None, description="file holding the NATS password (a Docker secret, or up's nats-password)"
    )
    nats_connect_timeout: float = Field(
        15.0,
        gt=0,
        description="seconds to keep retrying the first NATS connection before giving up",
    )
    nats_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="JetStream replicas of every stream and KV bucket this service creates "
        "(1: one server; 3: a three-node cluster)",
    )
    data_dir: Path = Field(
        Path("~/.proxyfleet"), description="state directory (CA, keys, database)"
    )
    replica_id: str = Field(default_factory=_default_replica_id, description="this process's id")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line"
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (e.g. http://jaeger:4318); unset: tracing off "
        "(OTEL_EXPORTER_OTLP_ENDPOINT is honoured too)",
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces sampled (parent-based)"
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_otlp(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP/HTTP)")
        return v

    @field_validator("replica_id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not _ID_OK.match(v) or v == "all":
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ - (and not 'all')")
        return v

    @model_validator(mode="after")
    def _nats_credentials(self) -> CommonSettings:
        """Fold FLEET_NATS_USER / _PASSWORD / _PASSWORD_FILE into ``nats_url``.

        Every service connects with ``nats_url`` alone (``Bus.connect`` takes the
        credentials back out of it), so the separate settings reach every client
        without each one handling them. Credentials already in the URL win.
        """
        from libs.common import natsurl

        password = self.nats_password.get_secret_value() if self.nats_password else None
        if self.nats_password_file is not None:
            if password is not None:
                raise ValueError("set FLEET_NATS_PASSWORD or FLEET_NATS_PASSWORD_FILE, not both")
            path = self.nats_password_file.expanduser()
            try:
                password = path.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"FLEET_NATS_PASSWORD_FILE: cannot read {path}: {exc.strerror}"
                ) from None
            if not password:
                raise ValueError(f"FLEET_NATS_PASSWORD_FILE: {path} is empty")
        if self.nats_user and not password:
            raise ValueError("FLEET_NATS_USER needs FLEET_NATS_PASSWORD or _PASSWORD_FILE")
        self.nats_url = natsurl.with_credentials(self.nats_url, self.nats_user, password)
        return self


class ProxySettings(CommonSettings):
    """Settings of one proxy replica (``proxyfleet proxy``)."""

    proxy_listen: str = Field("127.0.0.1:8080", description="address the proxy listens on")
    proxy_mode: str = Field(
        "regular", description="regular, reverse:http[s]://host:port or upstream:http://host:port"
    )
    proxy_reuse_port: bool = Field(False, description="SO_REUSEPORT: several replicas on one port")
    proxy_start_listening: bool = Field(True, description="open the listener at start")
    intercept_tls: bool = Field(True, description="decrypt CONNECT tunnels (else tunnel all)")
    ignore_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated host globs tunnelled untouched"
    )
    capture_body_limit: int = Field(1 << 20, ge=0, description="bytes of each body recorded")
    capture_queue_size: int = Field(100_000, gt=0, description="flow events held while NATS lags")
    capture_batch_max: int = Field(256, gt=0, description="most flow events in one NATS message")
    capture_linger_ms: float = Field(5.0, ge=0, description="wait to fill a batch before publish")
    capture_queue_bytes: int = Field(
        128 << 20,
        gt=0,
        description="body and header bytes the capture queue holds while NATS lags",
    )
    redact_headers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_HEADERS),
        description="comma-separated header names masked in recorded flows",
    )
    upstream_verify_tls: bool = Field(True, description="verify upstream certificates")
    upstream_ca_bundle: Path | None = Field(None, description="extra CA bundle for upstream TLS")
    upstream_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect upstream")
    upstream_read_timeout: float = Field(60.0, gt=0, description="seconds of upstream silence")
    client_idle_timeout: float = Field(60.0, gt=0, description="keep-alive idle seconds (client)")
    client_body_timeout: float = Field(
        30.0, gt=0, description="seconds of grace before a request body's minimum rate applies"
    )
    client_body_min_rate: float = Field(
        1024.0, gt=0, description="bytes/s a request body must average (else 408)"
    )
    upstream_pool_size: int = Field(64, ge=0, description="idle upstream connections kept per host")
    drain_timeout: float = Field(10.0, ge=0, description="default graceful-stop deadline, seconds")
    heartbeat_interval: float = Field(2.0, gt=0, description="seconds between registry heartbeats")
    proxy_metrics_listen: str = Field(
        "", description="host:port serving Prometheus /metrics ('' or 'off': none)"
    )
    destination_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs, IPs or host globs (optional :port) exempt from "
        "the private-range refusal",
    )
    destination_deny: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs, IPs or host globs (optional :port) always refused",
    )
    protected_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:8081"],
        description="comma-separated host:port of other fleet services (the API, the store's "
        "metrics) never reachable through the proxy",
    )

    @field_validator(
        "ignore_hosts",
        "destination_allow",
        "destination_deny",
        "protected_endpoints",
        "redact_headers",
        mode="before",
    )
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("destination_allow", "destination_deny")
    @classmethod
    def _check_destinations(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_destination(entry)
        return v

    @field_validator("protected_endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_hostport(entry)
        return v

    @field_validator("proxy_listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("proxy_metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, v: str) -> str:
        return optional_listen(v)

    @field_validator("proxy_mode")
    @classmethod
    def _check_mode(cls, v: str) -> str:
        if v == "regular":
            return v
        if v.startswith("reverse:"):
            from urllib.parse import urlsplit

            u = urlsplit(v.removeprefix("reverse:"))
            if u.scheme in ("http", "https") and u.hostname:
                return v
        if v.startswith("upstream:"):
            from urllib.parse import urlsplit

            u = urlsplit(v.removeprefix("upstream:"))
            if u.scheme == "http" and u.hostname and not u.username:
                return v
        raise ValueError(
            "must be 'regular', 'reverse:http[s]://host[:port]' or 'upstream:http://host[:port]'"
        )


class StoreSettings(CommonSettings):
    """Settings of the flow store (``proxyfleet store``)."""

    _pg_password: SecretStr | None = PrivateAttr(None)

    store_db: str | None = Field(
        None,
        description="SQLite database file (default: $FLEET_DATA_DIR/flows.db), or a PostgreSQL "
        "URL (postgresql://user:password@host:port/db)",
        repr=False,  # a URL may hold a password
    )
    store_db_password_file: Path | None = Field(
        None,
        description="file holding the PostgreSQL password (a Docker secret); it wins over a "
        "password in the URL",
    )
    store_pg_pool: int = Field(
        8,
        ge=2,
        le=100,
        description="PostgreSQL connections a store keeps (ingest, queries, retention)",
    )
    store_max_age: float = Field(
        7 * 24 * 3600.0, gt=0, description="seconds a flow is kept (retention by age)"
    )
    store_max_flows: int = Field(
        1_000_000, gt=0, description="most flows kept; the oldest are pruned first"
    )
    store_prune_interval: float = Field(30.0, gt=0, description="seconds between retention passes")
    store_fetch_batch: int = Field(
        32, gt=0, le=1024, description="most FLOWS messages fetched and committed at once"
    )
    store_ingest_workers: int = Field(
        2,
        ge=0,
        le=32,
        description="processes that decode and write flow batches (0: in the store process)",
    )
    store_scan_limit: int = Field(
        20_000,
        ge=100,
        le=10_000_000,
        description="rows a filter that SQL cannot decide alone (headers, bodies) rechecks "
        "per listing; past it the page is partial and its cursor continues",
    )
    store_ack_wait: float = Field(
        10.0,
        gt=0,
        description="seconds before JetStream redelivers a message a store did not ack",
    )
    store_replica_check_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="seconds between checks for replicas whose registry entry expired "
        "(replica_gone events)",
    )
    store_metrics_listen: str = Field(
        "", description="host:port serving Prometheus /metrics ('' or 'off': none)"
    )
    store_claim_ttl: float = Field(
        15.0,
        ge=1,
        le=3600,
        description="seconds a store's claim on the FLOWS stream outlives its last heartbeat "
        "(a store with another database is refused while the claim holds)",
    )

    @field_validator("store_db", mode="before")
    @classmethod
    def _db_kind(cls, v: object) -> object:
        """A PostgreSQL URL or a file path. Another URL is refused, naming only its scheme:
        the rest may hold a password, and taken as a path it would silently become a
        SQLite file named after the URL."""
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, str) and (m := _URL_SCHEME.match(v.strip())):
            if m.group(1).lower() not in PG_SCHEMES:
                raise ValueError(
                    f"{m.group(1)}:// URLs are not supported (a SQLite file path, or "
                    "postgresql://user:password@host:port/database)"
                )
            return v.strip()
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("store_metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, v: str) -> str:
        return optional_listen(v)

    @model_validator(mode="after")
    def _db_password(self) -> StoreSettings:
        """Read ``FLEET_STORE_DB_PASSWORD_FILE`` now: a bad file is a start-up error."""
        self._pg_password = None
        path = self.store_db_password_file
        if path is None:
            return self
        if self.pg_dsn is None:
            raise ValueError("FLEET_STORE_DB_PASSWORD_FILE needs a postgresql:// FLEET_STORE_DB")
        try:
            password = path.expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"FLEET_STORE_DB_PASSWORD_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        if not password:
            raise ValueError(f"FLEET_STORE_DB_PASSWORD_FILE: {path} is empty")
        self._pg_password = SecretStr(password)
        return self

    @property
    def pg_password(self) -> str | None:
        """The PostgreSQL password from ``FLEET_STORE_DB_PASSWORD_FILE`` (None: the URL's)."""
        secret = self._pg_password
        return secret.get_secret_value() if secret is not None else None

    @property
    def pg_dsn(self) -> str | None:
        """The PostgreSQL URL when ``store_db`` is one, else None (SQLite)."""
        v = self.store_db
        if v is not None and (m := _URL_SCHEME.match(v)) and m.group(1).lower() in PG_SCHEMES:
            return v
        return None

    @property
    def db_path(self) -> Path:
        """The SQLite database file: ``store_db``, else ``flows.db`` in the data dir."""
        if self.store_db is None or self.pg_dsn is not None:
            return self.data_dir / "flows.db"
        return Path(self.store_db).expanduser()

    @property
    def db_label(self) -> str:
        """The database, fit to print and log (a URL's password masked)."""
        if self.pg_dsn is not None:
            return redact_url(self.pg_dsn)
        return str(self.db_path)


PG_SCHEMES = ("postgresql", "postgres")


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: a URL fit to print (its password masked)."""
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


class ApiKeySpec(BaseModel):
    """One configured API key, reduced to its SHA-256 digest as soon as it is read.

    The plaintext never lives in a settings object (so a settings repr or a crash
    dump cannot show it); only the digest is compared, in constant time.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    scope: Literal["read", "admin"]
    sha256: bytes = Field(repr=False)


_MIN_SECRET = 16


def parse_api_key(entry: str) -> ApiKeySpec:
    """``id:scope:secret`` -> ``ApiKeySpec``; ``secret`` may be ``sha256:<64 hex digits>``."""
    parts = entry.strip().split(":", 2)
    if len(parts) != 3:
        raise ValueError("each key must be id:scope:secret")
    key_id, scope, secret = (p.strip() for p in parts)
    if not _ID_OK.match(key_id):
        raise ValueError("key id must be 1-64 characters of A-Z a-z 0-9 _ -")
    if scope not in ("read", "admin"):
        raise ValueError(f"key {key_id}: scope must be 'read' or 'admin'")
    if secret.startswith("sha256:"):
        hexdigest = secret.removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
            raise ValueError(f"key {key_id}: sha256: must be followed by 64 hex digits")
        digest = bytes.fromhex(hexdigest)
    else:
        if len(secret) < _MIN_SECRET:
            raise ValueError(f"key {key_id}: secret must be at least {_MIN_SECRET} characters")
        digest = hashlib.sha256(secret.encode()).digest()
    return ApiKeySpec(id=key_id, scope=scope, sha256=digest)  # type: ignore[arg-type]


# The generated admin key's file in the data dir: written by the API's first start, named by
# ``up``'s start lines, read by the command-line client.
API_KEY_FILE = "api-key"


class ApiSettings(CommonSettings):
    """Settings of the management API (``proxyfleet api``)."""

    api_listen: str = Field(
        default="127.0.0.1:8081", description="address the management API listens on"
    )
    api_keys: Annotated[list[ApiKeySpec], NoDecode] = Field(
        default_factory=list,
        description="comma-separated id:scope:secret (scope read|admin; secret or sha256:<hex>); "
        "empty: a generated admin key in $FLEET_DATA_DIR/api-key",
    )
    api_command_timeout: float = Field(
        default=5.0, gt=0, le=300, description="seconds to wait for replicas to answer a command"
    )
    api_store_timeout: float = Field(
        default=5.0, gt=0, le=300, description="seconds to wait for the flow store to answer"
    )
    api_config_apply_wait: float = Field(
        default=2.0, ge=0, le=60, description="seconds PUT /api/config waits for replicas to apply"
    )
    api_shutdown_timeout: float = Field(
        default=10.0, ge=0, le=3600, description="seconds in-flight API requests get on SIGTERM"
    )
    api_sse_heartbeat: float = Field(
        default=15.0, gt=0, le=3600, description="seconds between SSE heartbeat comments"
    )
    api_stream_queue_size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="events queued for one SSE subscriber before it is dropped as too slow",
    )
    api_approval_ttl: float = Field(
        default=3600.0,
        ge=1,
        le=7 * 24 * 3600,
        description="seconds an approve decision stays cached (the body's ttl_s overrides it)",
    )
    ui_session_ttl: float = Field(
        default=12 * 3600.0,
        ge=60,
        le=7 * 24 * 3600,
        description="seconds a web UI sign-in lasts (then the key is asked for again)",
    )
    ui_secure_cookie: bool | None = Field(
        default=None,
        description="mark the UI session cookie Secure; empty: when the request came over https",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v: object) -> object:
        if isinstance(v, str):
            v = [p for p in v.split(",") if p.strip()]
        if not isinstance(v, list):
            return v
        keys = [parse_api_key(p) if isinstance(p, str) else p for p in v]
        ids = [k.id if isinstance(k, ApiKeySpec) else None for k in keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique")
        digests = [k.sha256 for k in keys if isinstance(k, ApiKeySpec)]
        if len(set(digests)) != len(digests):
            raise ValueError("two keys share one secret")
        return keys

    @field_validator("ui_secure_cookie", mode="before")
    @classmethod
    def _auto_secure(cls, v: object) -> object:
        """An empty ``FLEET_UI_SECURE_COOKIE`` means auto (by the request's scheme)."""
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_listen")
    @classmethod
    def _check_api_listen(cls, v: str) -> str:
        parse_hostport(v)
        return v


S = TypeVar("S", bound=BaseSettings)


class SettingsError(Exception):
    """Settings could not be built; the message is one line naming the bad variables."""


def load(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment (plus ``overrides``), or raise ``SettingsError``."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        parts = []
        for err in exc.errors():
            if err["loc"]:
                parts.append(f"{prefix}{str(err['loc'][0]).upper()}: {err['msg']}")
            else:  # a check across fields: its message names the variables
                parts.append(str(err["msg"]).removeprefix("Value error, "))
        raise SettingsError("bad settings: " + "; ".join(parts)) from None


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700 when new) and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


__all__ = [
    "ApiKeySpec",
    "ApiSettings",
    "CommonSettings",
    "ProxySettings",
    "SettingsError",
    "StoreSettings",
    "ensure_private_dir",
    "load",
    "optional_listen",
    "parse_api_key",
    "parse_hostport",
]
