"""The HTTP layer: an app factory over a :class:`~graftune.serve.store.ModelStore` and a source of promoted
versions (a registry). Route functions validate nothing themselves (the request models do) and run no model code
(the store does, on its worker thread, fed by two :class:`~graftune.serve.batcher.Batcher` queues: one for
classification forwards, one for generations). Startup (first load, the batchers, the registry poller) and shutdown
(drain, last drift flush) live in the lifespan.
"""

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from graftune.errors import ConfigError, GraftuneError
from graftune.serve.batcher import Batcher, BatchRecord
from graftune.serve.drift import DriftTracker
from graftune.serve.schemas import (
    AdaptersResponse,
    GenerateResponse,
    Health,
    Limits,
    PredictResponse,
    request_models,
)
from graftune.serve.store import ModelStore, NotServed, PromptTooLong, Rows, ServeError, UnknownAdapter

log = logging.getLogger("graftune.serve")


class Source(Protocol):
    """Where the promoted versions come from: ``graftune.registry.Registry`` or a fixed mapping. A source may also
    have ``verify(version)`` (the registry's hash check), run before a version is loaded: the registry's
    ``promoted()`` lists a damaged version too (``damaged`` set), and its ``verify`` refuses it, so the store logs
    it once and serves the rest."""

    def promoted(self) -> Mapping[str, Any]:
        """name -> a version object with ``.version`` and ``.path`` (its run directory)."""

    def generation(self) -> Any:
        """A cheap value that changes whenever ``promoted()`` may have changed."""


@dataclass(frozen=True)
class StaticVersion:
    version: str
    path: Path


class StaticSource:
    """A fixed name -> run directory mapping (``graftune serve --run NAME=DIR``, tests, benchmarks)."""

    def __init__(self, runs: Mapping[str, str | Path]):
        self.runs = {n: StaticVersion("1", Path(p)) for n, p in runs.items()}

    def promoted(self) -> dict[str, StaticVersion]:
        return dict(self.runs)

    def generation(self) -> int:
        return 0


class MergedSource:
    """A registry's promoted versions plus fixed ``--run`` ones (the fixed ones win a name clash)."""

    def __init__(self, *sources: Source):
        self.sources = sources

    def promoted(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.sources:
            out.update(s.promoted())
        return out

    def generation(self) -> tuple:
        return tuple(s.generation() for s in self.sources)

    def verify(self, version: Any) -> None:
        """The registry's hash check for its versions; fixed ``--run`` directories are served as they are."""
        if isinstance(version, StaticVersion):
            return
        for s in self.sources:
            if callable(getattr(s, "verify", None)):
                s.verify(version)
                return


@dataclass(frozen=True)
class Settings:
    """Args:
    max_batch: rows per forward at most; 1 serves one request per forward.
    max_wait_ms: the batching window, at most a minute (a request waits up to this for company).
    poll_s: how often the source's generation is read (promote/rollback are followed within about this), from
        0.01 s (more often is a busy loop) to an hour.
    drift_every_s: how often drift summaries are written.
    api_key: when set, every endpoint but /health needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    limits: request limits (see :class:`~graftune.serve.schemas.Limits`).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    poll_s: float = 1.0
    drift_every_s: float = 10.0
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        # the options of `graftune serve`, named as the command spells them; NaN fails every comparison below
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"--max-batch: got {self.max_batch!r}; use 1 (one request per forward) or more")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ConfigError(f"--max-wait-ms: got {self.max_wait_ms}; use 0 to 60000 milliseconds (default 5)")
        if not 0.01 <= self.poll_s <= 3600:
            raise ConfigError(f"--poll: got {self.poll_s}; use 0.01 to 3600 seconds between registry checks "
                              "(default 1)")
        if not 0 < self.drift_every_s < float("inf"):
            raise ConfigError(f"drift_every_s: got {self.drift_every_s}; use a positive number of seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; pass a key or leave it out")


class Metrics:
    """Prometheus series of one app (its own CollectorRegistry: two apps in one process do not mix)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("graftune_requests", "Requests answered (every status), by adapter, endpoint and "
                                "HTTP status",
                                ["adapter", "endpoint", "status"], registry=self.registry)
        self.errors = Counter("graftune_request_errors", "Requests refused or failed, by adapter and reason",
                              ["adapter", "reason"], registry=self.registry)
        self.latency = Histogram("graftune_request_latency_seconds", "Request latency (queue + batch + forward)",
                                 ["adapter", "endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.inputs = Counter("graftune_inputs", "Texts classified or prompts answered, by adapter", ["adapter"],
                              registry=self.registry)
        # a predict batch is one forward; a generate batch is one batched generation (a forward per new token)
        self.batches = {"predict": self._batch_series("graftune_batch", "forward"),
                        "generate": self._batch_series("graftune_generate_batch", "batched generation")}
        self.adapters = Gauge("graftune_adapters_served", "Adapters served", registry=self.registry)

    def _batch_series(self, prefix: str, what: str) -> tuple[Histogram, Histogram, Histogram]:
        return (Histogram(f"{prefix}_rows", f"Rows per {what}", registry=self.registry,
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
                Histogram(f"{prefix}_requests", f"Requests per {what}", registry=self.registry,
                          buckets=(1, 2, 4, 8, 16, 32, 64)),
                Histogram(f"{prefix}_adapters", f"Distinct adapters per {what}", registry=self.registry,
                          buckets=(1, 2, 4, 8, 16, 32)))

    def on_batch(self, endpoint: str, record: BatchRecord) -> None:
        rows, requests, adapters = self.batches[endpoint]
        rows.observe(record.rows)
        requests.observe(record.requests)
        adapters.observe(len(record.adapters))


#: the endpoint label of each route (anything else is "other": the label's values stay few)
ENDPOINTS = {"/v1/predict": "predict", "/v1/generate": "generate", "/v1/adapters": "adapters", "/health": "health",
             "/metrics": "metrics"}


class CountRequests:
    """ASGI middleware, the outermost: every answered request counted by adapter, endpoint and status, whatever
    answered it (a route, a refusal, the body limit, a validation error). A route names the adapter in
    ``request.state.adapter``; ``_none`` when no served adapter was involved."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:  # an exception that escaped every handler is answered 500 by Starlette's outermost layer
            self.metrics.requests.labels(state.get("adapter", "_none"), ENDPOINTS.get(scope.get("path"), "other"),
                                         str(status or 500)).inc()


class BodyLimit:
    """ASGI middleware: a body larger than ``limit`` bytes is refused with 413 before anything parses it (by its
    Content-Length, or while it streams in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        text = f'{{"error": "request body larger than {self.limit} bytes; send fewer or shorter inputs"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})


def _one_line(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: where, and what is wrong."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        position = next((p for p in e.get("loc", ())[1:] if isinstance(p, int)), None)
        where = f" at position {position}" if position is not None else ""
        why = (e.get("ctx") or {}).get("error") or "decode error"
        return (f"the body is not valid JSON ({why}{where}); send one JSON object, e.g. "
                '{"adapter": "NAME", "inputs": ["TEXT"]}')
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    ctx = e.get("ctx") or {}
    # pydantic's wording for the size limits, with what to do instead ("List should have at least 1 item after
    # validation, not 0" said neither what the list holds nor the fix)
    if e.get("type") == "too_short" and where == "inputs":
        msg = "empty; send at least one text"
    elif e.get("type") == "too_long" and where == "inputs":
        msg = (f"{ctx.get('actual_length', 'too many')} texts; a request may hold at most {ctx.get('max_length')} "
               "items (the server's --max-inputs): split them into several requests")
    elif e.get("type") == "string_too_long" and where.startswith("inputs."):
        msg = (f"a text may have at most {ctx.get('max_length')} characters (the server's --max-chars); shorten it "
               "(the model reads only its first tokens anyway)")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}"


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this content type as JSON (no content type: it tries JSON)."""
    if not content_type:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def create_app(store: ModelStore, source: Source, settings: Settings | None = None, *,
               tracker: DriftTracker | None = None) -> FastAPI:
    """The server: ``store`` holds and runs the models, ``source`` says what to serve (polled for changes),
    ``tracker`` (optional) is the store's drift observer, flushed periodically and at shutdown."""
    settings = settings or Settings()
    metrics = Metrics()
    # one window for classification forwards, one for generations: the same mechanism, two queues (a batch is
    # one kind of forward), both run on the store's one worker thread
    def window(endpoint: str, run: Callable[[list[Rows]], list]) -> Batcher:
        return Batcher(store.submit, run, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                       on_batch=functools.partial(metrics.on_batch, endpoint))

    batcher, generator = window("predict", store.classify), window("generate", store.generate)
    PredictRequest, GenerateRequest = request_models(settings.limits)
    state: dict[str, Any] = {"generation": object(), "error": None}

    verify = getattr(source, "verify", None)

    def wanted() -> dict[str, tuple]:
        out = {}
        for n, v in source.promoted().items():
            check = functools.partial(verify, v) if verify else None
            asked = "given with --run" if isinstance(v, StaticVersion) else "promoted"
            out[n] = (str(v.version), Path(v.path), check, asked)
        return out

    async def refresh() -> None:
        """Read the source's cheap counter; on a change, load what is new and switch (store.sync: a version that
        cannot be served is logged once and skipped). When reading the source fails, say so once, not at every
        poll; the next poll retries."""
        try:
            generation = await asyncio.to_thread(source.generation)
            if generation != state["generation"]:
                await asyncio.to_thread(store.sync, await asyncio.to_thread(wanted))
                state["generation"] = generation
                metrics.adapters.set(len(store.names()))
        except Exception as e:  # a registry hiccup must not stop the server
            why = str(e) if isinstance(e, GraftuneError) else f"{type(e).__name__}: {e}"
            if why != state["error"]:
                log.warning("reading the promoted versions failed (%s); retrying every %g s", why, settings.poll_s,
                            exc_info=not isinstance(e, GraftuneError))
            state["error"] = why
            return
        if state["error"] is not None:
            log.info("reading the promoted versions works again")
            state["error"] = None

    async def follow() -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(settings.poll_s)
            await refresh()
            if tracker is not None and time.monotonic() - last_flush >= settings.drift_every_s:
                await asyncio.to_thread(tracker.flush)
                last_flush = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await refresh()
        log.info("serving %d adapter(s); %d refused", len(store.names()), len(store.failed))
        await batcher.start()
        await generator.start()
        poller = asyncio.create_task(follow(), name="graftune-follow")
        try:
            yield
        finally:
            poller.cancel()
            try:
                await poller
            except asyncio.CancelledError:
                pass
            await batcher.stop()
            await generator.stop()
            if tracker is not None:
                await asyncio.to_thread(tracker.flush)
            await asyncio.to_thread(store.close)

    app = FastAPI(title="graftune", summary="Many adapters on one base, mixed-adapter batches", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # added last: the outermost, so it sees every answer
    app.state.store, app.state.batcher, app.state.generator = store, batcher, generator
    app.state.metrics, app.state.settings = metrics, settings

    def key_given(request: Request) -> bool:
        if settings.api_key is None:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), settings.api_key.encode())

    def no_key() -> _Refusal:
        return _Refusal(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", "auth")

    async def check_key(request: Request) -> None:
        if not key_given(request):
            raise no_key()

    def answer(exc: "_Refusal", headers: Mapping[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(exc.adapter, exc.reason).inc()
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # FastAPI reads the body before any dependency runs: the key is checked here first, so a caller without
        # it learns nothing about what the body should be
        if not key_given(request):
            return answer(no_key())
        if not _is_json(request.headers.get("content-type")):
            got = request.headers.get("content-type")
            return answer(_Refusal(415, f"send 'Content-Type: application/json' with the JSON body (got {got!r}; "
                                        "curl -d alone sends a form)", "content_type"))
        return answer(_Refusal(422, _one_line(exc), "invalid"))

    @app.exception_handler(_Refusal)
    async def refused(request: Request, exc: _Refusal):
        return answer(exc)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException):
        """Starlette's own answers (no such route, a method the route does not take), in the server's format."""
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = (f"no route {where}; the routes are POST /v1/predict, POST /v1/generate, GET /v1/adapters, "
                       "GET /health, GET /metrics")
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "another method")
            message = f"{where}: method not allowed; use {allowed}"
        else:
            message = f"{where}: {exc.detail}"
        return answer(_Refusal(exc.status_code, message, "no_route"), exc.headers)

    async def run(request: Request, name: str, endpoint: str, call):
        started = time.perf_counter()
        try:
            entry = store.acquire(name)
        except NotServed as e:  # asked for, refused at load: the answer says why
            raise _Refusal(404, str(e), "not_served") from None
        except UnknownAdapter as e:
            raise _Refusal(404, str(e), "unknown_adapter") from None
        request.state.adapter = entry.name  # the label CountRequests counts this request under
        try:
            result = await call(entry)
        except PromptTooLong as e:
            raise _Refusal(422, str(e), "too_long", entry.name) from None
        except ServeError as e:
            raise _Refusal(400, str(e), "refused", entry.name) from None
        except Exception as e:
            log.exception("request for %s failed", name)
            raise _Refusal(500, f"internal error ({type(e).__name__}); see the server log", "internal",
                           entry.name) from None
        finally:
            store.release(entry)
        metrics.latency.labels(entry.name, endpoint).observe(time.perf_counter() - started)
        return entry, result

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              dependencies=[Depends(check_key)])
    async def predict(body: PredictRequest, request: Request):  # type: ignore[valid-type]
        async def call(entry):
            if entry.kind == "causal-lm":
                raise ServeError(f"{entry.name} is a causal-LM adapter; use POST /v1/generate")
            metrics.inputs.labels(entry.name).inc(len(body.inputs))
            return await batcher(Rows(entry, list(body.inputs)), len(body.inputs))

        entry, predictions = await run(request, body.adapter, "predict", call)
        return {"adapter": entry.name, "version": entry.version, "predictions": predictions}

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(check_key)])
    async def generate(body: GenerateRequest, request: Request):  # type: ignore[valid-type]
        async def call(entry):
            if entry.kind != "causal-lm":
                raise ServeError(f"{entry.name} is a classifier; use POST /v1/predict")
            outputs = await generator(Rows(entry, list(body.inputs), body.max_new_tokens), len(body.inputs))
            metrics.inputs.labels(entry.name).inc(len(body.inputs))  # answered: a refused prompt is not counted
            return outputs

        entry, outputs = await run(request, body.adapter, "generate", call)
        return {"adapter": entry.name, "version": entry.version, "outputs": outputs}

    @app.get("/v1/adapters", response_model=AdaptersResponse, dependencies=[Depends(check_key)])
    async def adapters():
        return {"adapters": store.describe()}

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "adapters": len(store.names()), "bases": len(store.slots)}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Refusal(Exception):
    """A request answered with a 4xx/5xx and a one-line reason."""

    def __init__(self, status: int, message: str, reason: str, adapter: str = "_none"):
        super().__init__(message)
        self.status, self.message, self.reason, self.adapter = status, message, reason, adapter
