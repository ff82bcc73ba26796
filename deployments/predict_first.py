"""POST /predict answered ahead of BentoML's middleware stack, with what that stack gave it.

BentoML wraps every request in eight layers (Starlette's error handler, its request metrics,
OpenTelemetry, the access log, the timeout, the concurrency limit, the service context, the user
middleware), each one wrapping `send` in a closure and most reading context variables. For one
text per request that cost ~0.4 ms of CPU against the 6-layer encoder's ~1.9 ms: the service
reached 0.73-0.79 of its compute ceiling at concurrency 32. Here one layer does for /predict what
the eight did, in BentoML's own terms so nothing downstream changes:

- the request metrics, under BentoML's names and labels (`bentoml_service_request_total`,
  `..._request_duration_seconds`, `..._request_in_progress`): `maas monitor` and dashboards read them;
- the access-log line, on BentoML's `bentoml.access` logger, in its format (written once per
  event-loop turn for the requests answered in it: AccessLog);
- the timeout (504) and the per-worker concurrency limit (429, "Too many requests");
- an unexpected error: logged with its traceback, answered 500.

Everything else (docs, health, metrics, /metadata, management, and /predict itself while
serving.trace_predictions asks for BentoML's spans) goes through BentoML as before. With
serving.cors, browsers' cross-origin calls are answered in front of all of it (with_cors).
"""

from __future__ import annotations

import asyncio
import logging
import time

from deployments import connections
from deployments.gate import ANSWER_HEADERS, PREDICT_PATH, refuse, reply, request_headers, with_headers
from deployments.turn_writes import EndOfTurn, writes

ACCESS_LOG = logging.getLogger("bentoml.access")
ERRORS = logging.getLogger("maas.serve")
METRICS_NAMESPACE = "bentoml_service"
ACCESS_FORMAT = "%s (%s) (%s) %.3fms"  # BentoML's access line: client, request, status, duration
# What a page's script may send across origins (serving.cors) besides what CORS always lets through
# (content-type among them): the key, a compressed body's coding, its own request id.
CORS_REQUEST_HEADERS = ["x-api-key", "authorization", "content-encoding", "x-request-id"]


class AccessLog(EndOfTurn):
    """The access lines of /predict, handed to the logger's handlers once per event-loop turn.

    A line written and flushed per request cost a one-text request 0.03-0.04 ms of its ~0.22 ms of
    event-loop CPU at concurrency 32 here (measured by switching the log off), four times what one
    line costs on an idle thread. The requests a batch answers are answered in one turn of the
    loop, so their lines now go out in one write and one flush (0.218-0.224 -> 0.206-0.210 ms).
    Making, filtering and formatting a record per line still cost ~0.03 ms of CPU per request under
    BentoML's log set-up (the gate in-process, one-text requests at concurrency 32: 0.095 ms of
    event-loop CPU a request, 0.065 with the log off), so a plain stream handler whose filters and
    formatter cannot read the message (handle_together) formats one record per turn, and each line
    is that record with its message put in (0.069 ms). Lines keep their order, format, logger,
    filters and handlers; a handler other than a plain stream handler (a file's, a test's) gets a
    record per line as before. Served (the student at c32), the event loops' CPU a request went from
    0.26-0.28 to 0.25 ms, the share of the ceiling within its rounds' spread."""

    def __init__(self, logger: logging.Logger = ACCESS_LOG):
        self.logger = logger
        self.pending: list[tuple] = []

    def add(self, *args) -> None:
        """One line, ACCESS_FORMAT % args; written at the end of this turn of the running loop."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.pending.append(args)
        self.flush_later()

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        handle_together(self.logger, lines)


MESSAGE_SLOT = "\x00maas-access-line\x00"  # where a line's message goes in the turn's formatted record


def handle_together(logger: logging.Logger, lines: list[tuple]) -> None:
    """logger.info(ACCESS_FORMAT, *args) for each line's args, except that a plain StreamHandler
    writes and flushes them all at once, and one whose filters and formatter cannot tell one line
    from another (message_blind) formats one record for them all."""
    if logger.disabled or not lines:
        return
    shared = None  # one record for the turn, its message MESSAGE_SLOT, where the logger's filters cannot read it
    if message_blind(logger):
        shared = filtered(logger, access_record(logger, MESSAGE_SLOT, None))
        if shared is None:
            return  # those filters drop every line alike
    records: list[logging.LogRecord] | None = None  # a record per line, made if a handler needs them
    for handler in logger_handlers(logger):
        if logging.INFO < handler.level:
            continue
        stream = type(handler).emit is logging.StreamHandler.emit
        if stream and shared is not None and message_blind(handler) and written_from(shared, handler, lines):
            continue
        if records is None:
            records = [record for record in (filtered(logger, access_record(logger, ACCESS_FORMAT, args))
                                             for args in lines) if record is not None]
        if stream:
            write_all(handler, "".join(formatted_lines(handler, records)), records[-1] if records else None)
        else:
            for record in records:
                handler.handle(record)


def written_from(shared: logging.LogRecord, handler: logging.StreamHandler, lines: list[tuple]) -> bool:
    """The lines written as `shared` formatted once with each line's message in MESSAGE_SLOT's place
    (or dropped, all alike, by the handler's filters); False where the format does not show the
    message once, so each line needs its own record."""
    kept = filtered(handler, shared)  # a filter may set fields the format reads (BentoML's adds the component)
    if kept is None:
        return True
    try:
        head, slot, tail = handler.format(kept).partition(MESSAGE_SLOT)
    except Exception:  # noqa: BLE001 - as StreamHandler.emit: reported by the handler, not raised
        handler.handleError(kept)
        return True
    if not slot or MESSAGE_SLOT in tail:
        return False
    end = tail + handler.terminator
    write_all(handler, "".join(head + ACCESS_FORMAT % args + end for args in lines), kept)
    return True


def access_record(logger: logging.Logger, message: str, args: tuple | None) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, args, None, "answer")


def message_blind(filterer: logging.Filterer) -> bool:
    """Whether a logger's or handler's filters (and a handler's formatter) give every access line the
    same treatment: none, logging's own name filter, BentoML's (which add the component and trace),
    and logging's own Formatter. Anything else may read the message, so it gets each line's record."""
    for kind in filterer.filters:
        kind = type(kind)
        if kind is not logging.Filter and kind.__module__ != "bentoml._internal.log":
            return False
    if isinstance(filterer, logging.Handler):
        return filterer.formatter is None or type(filterer.formatter) is logging.Formatter
    return True


def formatted_lines(handler: logging.StreamHandler, records: list[logging.LogRecord]):
    for record in records:
        kept = filtered(handler, record)
        if kept is not None:
            try:
                yield handler.format(kept) + handler.terminator
            except Exception:  # noqa: BLE001 - as StreamHandler.emit: reported by the handler, not raised
                handler.handleError(kept)


def write_all(handler: logging.StreamHandler, text: str, record: logging.LogRecord | None) -> None:
    if not text:
        return
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    except Exception:  # noqa: BLE001 - as StreamHandler.emit
        handler.handleError(record)
    finally:
        handler.release()


def filtered(filterer: logging.Filterer, record: logging.LogRecord) -> logging.LogRecord | None:
    """The record as `filterer`'s filters pass it (from Python 3.12 a filter may return a changed
    copy), or None if one drops it."""
    kept = filterer.filter(record)
    if not kept:
        return None
    return kept if isinstance(kept, logging.LogRecord) else record


def logger_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of `logger` reaches, as Logger.callHandlers walks them."""
    handlers, current = [], logger
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    return handlers


class RequestMetrics:
    """BentoML's request metrics for one endpoint. Under `bentoml serve` prometheus_client runs in
    multiprocess mode: a value is written to the worker's metrics file by name and labels, whatever
    registry holds the metric object, so these stay unregistered (BentoML registers the same names
    for the other endpoints) and /metrics reports them with BentoML's. Their writes go out once
    per turn of the event loop (turn_writes.py)."""

    def __init__(self, endpoint: str, service_name: str, service_version: str):
        from prometheus_client import Counter, Gauge, Histogram

        from bentoml._internal.configuration.containers import BentoMLContainer

        labels = {"endpoint": endpoint, "service_name": service_name, "service_version": service_version}
        self.labels = labels
        by_status = ["endpoint", "service_name", "service_version", "http_response_code"]
        self.total = Counter("request_total", "Total number of HTTP requests", by_status,
                             namespace=METRICS_NAMESPACE, registry=None)
        self.duration = Histogram("request_duration_seconds", "API HTTP request duration in seconds", by_status,
                                  namespace=METRICS_NAMESPACE, registry=None,
                                  buckets=BentoMLContainer.duration_buckets.get())
        self.in_progress = Gauge("request_in_progress", "Total number of HTTP requests in progress now",
                                 list(labels), namespace=METRICS_NAMESPACE, registry=None,
                                 multiprocess_mode="livesum").labels(**labels)
        self.by_status: dict[int, tuple] = {}

    def started(self) -> None:
        writes.inc(self.in_progress)

    def record(self, status: int, seconds: float) -> None:
        """A request answered: out of progress, counted and timed."""
        children = self.by_status.get(status)
        if children is None:
            children = self.by_status[status] = (self.total.labels(**self.labels, http_response_code=status),
                                                 self.duration.labels(**self.labels, http_response_code=status))
        writes.inc(self.in_progress, -1)
        writes.inc(children[0])
        writes.observe(children[1], seconds)


class PredictFirst:
    """The service's outermost ASGI app: /predict goes to the gate of the service instance in this
    worker (found per request: BentoML makes the instance after the app), the rest to BentoML."""

    def __init__(self, app, find_gate, timeout_s: float, max_concurrency: int, service_name: str):
        """find_gate: () -> the worker's ServiceGate, or None until the instance exists.
        max_concurrency: requests answered at once in this worker; more are refused 429, as BentoML does."""
        self.app, self.find_gate = app, find_gate
        self.timeout_s, self.max_concurrency = timeout_s, max_concurrency
        from bentoml._internal.context import server_context

        # BentoML's worker names the Bento in server_context before it builds the app
        self.metrics = RequestMetrics(PREDICT_PATH, server_context.bento_name or service_name,
                                      server_context.bento_version or "not available")
        self.in_flight = 0
        self.access_log = AccessLog()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH:
            return await self.app(scope, receive, send)
        gate = self.find_gate()
        if gate is None or gate.settings.trace_predictions:
            return await self.app(scope, receive, send)
        await self.answer(gate, scope, receive, send)

    async def answer(self, gate, scope, receive, send) -> None:
        started, status = time.perf_counter(), 0

        async def answering(message):
            """The status for the metrics, the security headers (gate.py), and `connection: close`
            where this worker holds more than its share of the connections (connections.py)."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = with_headers(message, gate.security_headers)
                shares = connections.worker_shares
                if shares is not None and shares.over_share():
                    message = with_headers(message, connections.CLOSE)
            await send(message)

        self.metrics.started()
        self.in_flight += 1
        try:
            if self.in_flight > self.max_concurrency:
                await refuse(receive, request_headers(scope), answering, 429, {"error": "Too many requests"})
            elif scope["method"] != "POST":
                await reply(answering, 405, {"error": f"{PREDICT_PATH} takes POST"}, {"allow": "POST"})
            else:
                async with asyncio.timeout(self.timeout_s):
                    await gate.predict(scope, receive, answering)
        except TimeoutError:
            if not status:
                await reply(answering, 504, {"error": f"Not able to process the request in {self.timeout_s:g} seconds"})
        except Exception:  # noqa: BLE001 - as Starlette's error handler: logged with its traceback, answered 500
            ERRORS.exception("POST %s failed", PREDICT_PATH)
            if not status:
                await reply(answering, 500, {"error": "internal server error"})
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - started
            self.metrics.record(status or 500, seconds)
            if gate.settings.access_log:
                client = scope.get("client")
                self.access_log.add(f"{client[0]}:{client[1]}" if client else "_",
                                    f"scheme={scope['scheme']},method={scope['method']},path={PREDICT_PATH}",
                                    f"status={status or 500}", seconds * 1000)


def with_cors(app, cors):
    """The service's outermost app under serving.cors (a maas.config.CorsConfig): Starlette's CORS
    middleware, which answers a browser's preflight request and marks the answers to the pages of
    the allowed origins, for /predict and every other path alike. BentoML's own CORS setting sits
    under PredictFirst, where /predict never reaches it. Without origins, the app as it is: no
    browser page on another origin may read an answer."""
    if not cors.enabled:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=cors.allow_origins, allow_methods=["GET", "POST"],
                          allow_headers=CORS_REQUEST_HEADERS, allow_credentials=cors.allow_credentials,
                          expose_headers=ANSWER_HEADERS, max_age=cors.max_age_s)
