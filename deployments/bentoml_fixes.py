"""Two fixes to how BentoML 1.4 runs a service, measured on the serving benchmark (one-row
requests at concurrency 32: p99 from 100-200 ms down to ~30 ms with both). How its workers share
the connections is deployments/connections.py."""

from __future__ import annotations

import asyncio
import gc


def cancel_bentoml_timeout_timers() -> None:
    """BentoML 1.4's TimeoutMiddleware starts a `traffic.timeout` timer per request and never
    cancels it, so every request's future, tracing span and context stay alive for 30 s: ~30k
    requests' worth at 1k requests/s. The collector's full passes over them took 60-200 ms and set
    the service's p99. This is the same middleware with the timer cancelled when the request ends,
    and a request that fails before it answers is not left waiting for the timer."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware, "_maas_cancels_timers", False):
        return

    async def call(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def send_and_release(message):
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        request = asyncio.ensure_future(self.app(scope, receive, send_and_release))
        request.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        except asyncio.TimeoutError:
            if request.cancel():
                timed_out = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                         status_code=504)
                await timed_out(scope, receive, send)
        else:
            await request
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = call
    TimeoutMiddleware._maas_cancels_timers = True


def freeze_startup_objects() -> None:
    """Move everything loaded so far (BentoML, ONNX Runtime, pydantic: ~100k objects) out of the
    garbage collector's sight. Its full passes over them stalled requests for tens of ms."""
    gc.collect()
    gc.freeze()
