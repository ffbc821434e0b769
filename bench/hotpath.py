"""Per-request costs of the data plane's pieces, in microseconds (timeit, one core).

What ``make bench`` cannot separate: the cost of an empty addon chain (the check
the relay makes at each hook point), of the destination check for a new upstream
connection (``destinations.pick`` on an IP literal, as the benchmark's upstream
is), and of our strict request-head parse and re-framed head, next to llhttp
parsing the same head. Run: ``.venv/bin/python bench/hotpath.py``.
"""

from __future__ import annotations

import asyncio
import timeit

from httptools import HttpRequestParser

from services.proxy import destinations, framing
from services.proxy.destinations import DestinationPolicy, ProtectedEndpoints
from services.proxy.hooks import AddonChain

HEAD = (
    b"GET http://127.0.0.1:18080/ HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n"
    b"User-Agent: wrk\r\nAccept: */*\r\n"
)


class _Sink:
    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_url(self, url: bytes) -> None:
        pass


def per_call_us(stmt: object, n: int = 200_000) -> float:
    return min(timeit.repeat(stmt, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]


def main() -> None:
    chain = AddonChain()
    rows = [("empty addon chain, one hook point", per_call_us(lambda: chain.request_head and 1))]
    rows.append(
        ("parse_request_head (4 headers)", per_call_us(lambda: framing.parse_request_head(HEAD)))
    )
    req = framing.parse_request_head(HEAD)
    rows.append(
        (
            "request_head rebuild + Via",
            per_call_us(
                lambda: framing.request_head(
                    req.method, b"/", req.headers, b"127.0.0.1:18080", req.body, 0,
                    req.conn_drop, None, b"1.1 proxyfleet-bench",
                )
            ),
        )
    )  # fmt: skip
    sink = _Sink()
    whole = HEAD + b"\r\n"
    rows.append(
        (
            "llhttp parse of the same head",
            per_call_us(lambda: HttpRequestParser(sink).feed_data(whole)),
        )
    )
    policy = DestinationPolicy.build(
        [], [], ProtectedEndpoints.resolve([("127.0.0.1", 4222), ("127.0.0.1", 8080)]), False
    )
    loop = asyncio.new_event_loop()

    def pick() -> None:
        coro = destinations.pick(policy, loop, "127.0.0.1", 18080)
        try:
            coro.send(None)
        except StopIteration:
            pass

    rows.append(("destination check, IP literal (per new connection)", per_call_us(pick, 50_000)))
    loop.close()
    width = max(len(r[0]) for r in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.2f} us")


if __name__ == "__main__":
    main()
