"""Every NATS wire name proxyfleet uses: streams, subjects, KV buckets, queue groups.

One module so that a subject is never spelt twice. Replica ids and verbs are
inserted by the helper functions below; nothing else builds a subject string.
"""

from __future__ import annotations

# Flow events (data plane -> store). One message carries a JSON array of events.
FLOWS_STREAM = "FLOWS"
FLOWS_PREFIX = "fleet.flows"
FLOWS_SUBJECTS = f"{FLOWS_PREFIX}.>"
# NATS header of a FLOWS message: the W3C traceparents of the sampled flows it carries
# (comma-separated), so a consumer can continue each flow's trace without decoding it.
FLOW_TRACES_HEADER = "Fleet-Flow-Traces"

# System events (lifecycle, config, audit).
EVENTS_STREAM = "EVENTS"
EVENTS_PREFIX = "fleet.events"
EVENTS_SUBJECTS = f"{EVENTS_PREFIX}.>"

# KV buckets.
CONFIG_BUCKET = "fleet_config"
CONFIG_KEY = "proxy"
CA_CERT_KEY = "ca_cert"  # the proxies' CA certificate (PEM), for client onboarding via the API
CONFIG_HISTORY = 64
# The rules policy (``libs.common.policy``): one document, revision = KV revision.
POLICY_BUCKET = "fleet_policy"
POLICY_KEY = "policy"
POLICY_HISTORY = 64
# Cached intercept approvals (``libs.common.approvals``): key = ``cache_key``, value JSON;
# entries carry their own expiry, the bucket's max age bounds them all.
APPROVALS_BUCKET = "fleet_approvals"
APPROVALS_MAX_AGE = 7 * 24 * 3600.0
REPLICAS_BUCKET = "fleet_replicas"
# SHA-256 digests of the management API's keys (key: the hex digest, value: JSON with the
# key's id and scope): proxies mask these keys wherever they see them in recorded traffic.
KEYS_BUCKET = "fleet_keys"
# API keys made at runtime (``POST /api/keys``): ``key.<id>`` holds the key's id, scope,
# SHA-256 digest and creation (never the key); ``used.<id>`` when it was last used. Every
# API replica watches the bucket: a key made or revoked on one is honoured by all.
API_KEYS_BUCKET = "fleet_api_keys"
# Web UI sign-in sessions: ``s.<SHA-256 of the session token>`` holds the key id, the CSRF
# token and the expiry (never the token); the bucket's max age bounds every session.
UI_SESSIONS_BUCKET = "fleet_ui_sessions"
UI_SESSIONS_MAX_AGE = 7 * 24 * 3600.0
# The flow store's claim on the FLOWS stream: key ``STORE_CLAIM_KEY`` holds the identity of
# the database that ingests it (entries expire with the bucket's TTL unless heartbeated).
STORE_CLAIM_BUCKET = "fleet_store"
STORE_CLAIM_KEY = "flows"

# Commands (request/reply).
CMD_PREFIX = "fleet.cmd"
CMD_ALL = "all"

# Store queries (request/reply, queue group).
STORE_PREFIX = "fleet.store"
STORE_QUEUE = "store"
STORE_VERBS = ("list", "get", "count", "export", "har")

# The durable JetStream consumer every store replica pulls FLOWS from (a shared work queue).
STORE_DURABLE = "store"

# The management API's system events: ``fleet.events.api.audit`` (one per mutating call).
API_SOURCE = "api"
AUDIT_EVENT = "audit"


def flows_subject(replica: str, kind: str = "batch") -> str:
    """Subject a replica publishes its flow-event batches on."""
    return f"{FLOWS_PREFIX}.{replica}.{kind}"


def events_subject(source: str, event_type: str) -> str:
    """Subject of one system event, e.g. ``fleet.events.proxy-1.replica_started``."""
    return f"{EVENTS_PREFIX}.{source}.{event_type}"


def command_subject(target: str, verb: str) -> str:
    """Subject of a command to one replica (``target`` = replica id) or to all (``all``)."""
    return f"{CMD_PREFIX}.{target}.{verb}"


def command_wildcard(target: str) -> str:
    """Wildcard a replica subscribes to for the commands addressed to ``target``."""
    return f"{CMD_PREFIX}.{target}.*"


def store_subject(verb: str) -> str:
    """Subject of a store query (``list``, ``get``, ``count``, ...)."""
    return f"{STORE_PREFIX}.{verb}"


def kv_stream(bucket: str) -> str:
    """The JetStream stream that backs KV ``bucket`` (JetStream's ``KV_<bucket>`` convention)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The stream subject of ``key`` in KV ``bucket`` (``>`` for every key)."""
    return f"$KV.{bucket}.{key}"


def flows_filter(replica: str | None = None) -> str:
    """Filter subject of the flow events of one replica (``None``: of every replica)."""
    return f"{FLOWS_PREFIX}.{replica}.*" if replica else FLOWS_SUBJECTS


def events_filter(source: str | None = None, event_type: str | None = None) -> str:
    """Filter subject of system events of one source and/or one type (``None``: any)."""
    return f"{EVENTS_PREFIX}.{source or '*'}.{event_type or '*'}"
