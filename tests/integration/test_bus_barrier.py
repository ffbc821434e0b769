"""``Bus.barrier``: once it returns, a subscription is live for every other connection.

nats-py's ``flush()`` can return before the server saw a SUB queued just before it (the
PING overtakes the flusher's queue); a store or replica that starts and is asked at once
must never answer "no responders".
"""

from __future__ import annotations

import nats
import pytest
from nats.aio.msg import Msg

from libs.common.bus import Bus

pytestmark = pytest.mark.timeout(60)


async def test_a_subscription_is_live_for_others_once_barrier_returns(nats_url: str) -> None:
    asker = await nats.connect(nats_url)
    try:
        for i in range(150):
            bus = await Bus.connect(nats_url, "barrier test", 5.0)
            try:

                async def answer(msg: Msg) -> None:
                    await msg.respond(b"here")

                await bus.nc.subscribe(f"test.barrier.{i}", queue="q", cb=answer)
                await bus.barrier()
                reply = await asker.request(f"test.barrier.{i}", b"", timeout=5.0)
                assert reply.data == b"here"
            finally:
                await bus.close()
    finally:
        await asker.close()
