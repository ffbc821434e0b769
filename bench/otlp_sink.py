"""A tiny OTLP/HTTP traces receiver for the benchmark: accepts ``POST /v1/traces``,
counts requests, spans and bytes, and answers ``GET /stats`` with those counts as JSON.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OK = ExportTraceServiceResponse().SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    stats = {"requests": 0, "spans": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        stats["requests"] += 1
        stats["bytes"] += len(body)
        stats["spans"] += sum(
            len(ss.spans) for rs in export.resource_spans for ss in rs.scope_spans
        )
        return web.Response(body=OK, content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
