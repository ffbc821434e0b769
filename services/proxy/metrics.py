"""The proxy replica's Prometheus metrics, read at scrape time.

Nothing here runs per request: the collector reads what the replica already
keeps (live connection and flow tables, the relay's finished-flow counter, the
capture queue's counters, and the ``FlowTally`` the publisher fills as it
serialises final events) whenever ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from services.proxy.capture import LATENCY_BUCKETS, STATUS_CLASSES

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from libs.common.bus import Bus
    from libs.common.settings import ProxySettings
    from services.proxy.context import ProxyContext
    from services.proxy.control import Control
    from services.proxy.server import ProxyServer

PREFIX = "proxyfleet_proxy_"


class Replica(Protocol):
    """What the collector reads of a replica (``services.proxy.main.Replica``); a
    protocol, so that this module does not import the one that imports it."""

    settings: ProxySettings
    ctx: ProxyContext | None
    server: ProxyServer | None
    control: Control | None
    bus: Bus | None


class ProxyCollector(Collector):
    """Samples of one replica; empty until the replica has started."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        r = self.replica
        ctx = r.ctx
        if ctx is None:
            return
        cap = ctx.capture
        tally = cap.tally
        yield InfoMetricFamily(
            PREFIX + "replica",
            "This proxy replica",
            value={"replica": ctx.replica, "mode": r.settings.proxy_mode},
        )
        listening = GaugeMetricFamily(
            PREFIX + "listening", "1 while the listener accepts connections, else 0"
        )
        listening.add_metric(
            [], 1.0 if r.server is not None and r.server.state == "running" else 0.0
        )
        yield listening
        yield GaugeMetricFamily(
            PREFIX + "active_connections",
            "Client connections open now (keep-alive, tunnels and websockets included)",
            value=len(ctx.connections),
        )
        yield GaugeMetricFamily(
            PREFIX + "active_flows", "Flows in progress now", value=len(ctx.active)
        )
        yield GaugeMetricFamily(
            PREFIX + "upstream_idle_connections",
            "Idle upstream keep-alive connections in the pool",
            value=ctx.pool.idle_count,
        )
        yield CounterMetricFamily(
            PREFIX + "flows_finished",
            "Flows that reached a final state (completed, error, killed), counted by the relay",
            value=ctx.flows_total,
        )
        by_class = CounterMetricFamily(
            PREFIX + "flows",
            "Finished flows by response status class (error: the proxy answered or cut the "
            "exchange; killed: by an operator). Counted when the capture publisher serialises "
            "the flow's final event, so flows still queued and flows whose final event was "
            'dropped (see flow_events_dropped_total{event="final"}) are not included',
            labels=["status_class"],
        )
        for name, n in zip(STATUS_CLASSES, tally.by_class, strict=True):
            if n or name != "other":
                by_class.add_metric([name], n)
        yield by_class
        moved = CounterMetricFamily(
            PREFIX + "body_bytes",
            "Body bytes relayed by finished flows (request and response bodies; all bytes of "
            "tunnels and websockets), counted with flows_total",
            labels=["direction"],
        )
        moved.add_metric(["client_to_server"], tally.bytes_client_to_server)
        moved.add_metric(["server_to_client"], tally.bytes_server_to_client)
        yield moved
        buckets: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(LATENCY_BUCKETS, tally.latency_buckets, strict=False):
            acc += n
            buckets.append((_bound(bound), acc))
        buckets.append(("+Inf", acc + tally.latency_buckets[-1]))
        yield HistogramMetricFamily(
            PREFIX + "upstream_latency_seconds",
            "Upstream wait of finished flows: request fully sent to first response byte. "
            "Counted with flows_total (final events serialised by the capture publisher)",
            buckets=buckets,
            sum_value=tally.latency_sum,
        )
        events = CounterMetricFamily(
            PREFIX + "flow_events_published",
            "Flow events published to the FLOWS stream (acknowledged by JetStream)",
            value=cap.published,
        )
        yield events
        yield CounterMetricFamily(
            PREFIX + "flow_batches_published",
            "FLOWS messages (batches of flow events) published",
            value=cap.batches,
        )
        dropped = CounterMetricFamily(
            PREFIX + "flow_events_dropped",
            "Flow events dropped because the capture queue was full, by events or by bytes "
            "(NATS down or slow). final: the flow goes unrecorded, unless its started event "
            "was still queued (then that one is published with the final state, its bodies "
            "and response headers let go of and marked truncated)",
            labels=["event"],
        )
        dropped.add_metric(["started"], cap.dropped - cap.dropped_final)
        dropped.add_metric(["final"], cap.dropped_final)
        yield dropped
        yield GaugeMetricFamily(
            PREFIX + "flow_events_queued",
            "Flow events waiting in the capture queue",
            value=cap.pending,
        )
        yield GaugeMetricFamily(
            PREFIX + "flow_events_queue_capacity",
            "Most flow events the capture queue holds (FLEET_CAPTURE_QUEUE_SIZE)",
            value=cap.queue_size,
        )
        yield GaugeMetricFamily(
            PREFIX + "flow_events_queued_bytes",
            "Body and header bytes held by the flow events in the capture queue",
            value=cap.queued_bytes,
        )
        yield GaugeMetricFamily(
            PREFIX + "flow_events_queue_bytes_capacity",
            "Most body and header bytes the capture queue holds (FLEET_CAPTURE_QUEUE_BYTES)",
            value=cap.queue_bytes,
        )
        undeliverable = CounterMetricFamily(
            PREFIX + "flow_events_undeliverable",
            "Flow events taken for publishing that never reached the FLOWS stream: refused by "
            "NATS for a reason retrying cannot fix (over a size limit, a bad request), or still "
            "unsent when the replica stopped. final: the flow's final state is lost",
            labels=["event"],
        )
        undeliverable.add_metric(["started"], cap.undeliverable - cap.undeliverable_final)
        undeliverable.add_metric(["final"], cap.undeliverable_final)
        yield undeliverable
        yield CounterMetricFamily(
            PREFIX + "flow_events_truncated",
            "Flow events shrunk to fit one NATS message (bodies, then headers, cut; the event "
            "says truncated)",
            value=cap.truncated,
        )
        faults = CounterMetricFamily(
            PREFIX + "upstream_faults",
            "Upstream protocol faults: response head over 64 KiB (502), bytes no request "
            "asked for (connection not reused), unparsable response (502)",
            labels=["fault"],
        )
        for fault, count in ctx.upstream_faults.items():
            faults.add_metric([fault], count)
        yield faults
        yield GaugeMetricFamily(
            PREFIX + "config_revision",
            "Runtime config revision applied (0: the settings at start)",
            value=ctx.config.revision,
        )
        config_ok = GaugeMetricFamily(
            PREFIX + "config_error",
            "1 while the newest config revision was rejected (the last good one applies)",
        )
        config_ok.add_metric([], 1.0 if r.control is not None and r.control.config_error else 0.0)
        yield config_ok
        yield GaugeMetricFamily(
            PREFIX + "nats_connected",
            "1 while the NATS connection is up",
            value=1.0 if r.bus is not None and r.bus.connected else 0.0,
        )


def _bound(value: float) -> str:
    return repr(float(value))


def registry_for(replica: Replica) -> CollectorRegistry:
    """A registry of this replica's own (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(replica))
    return registry
