"""The OpenAI-compatible HTTP server: FastAPI routes in front of AsyncLLM, run by uvicorn.

The event loop only parses, validates, tokenizes, streams and aborts; the engine steps in a process of its own
(an engine core, `engine/core.py`). Every error
is answered in OpenAI's JSON shape. SIGTERM (or Ctrl-C) drains: the listening socket closes, in-flight
requests get `--shutdown-timeout` seconds to finish, then the rest are aborted (finish_reason "abort"),
and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from multiprocessing import resource_tracker
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedllm
from pagedllm.engine.async_engine import AsyncLLM
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest, ClassificationRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    EmbeddingRequest, ModelCard, ModelList, RerankRequest, ScoreRequest, TokenizeRequest, TokenizeResponse,
    VersionResponse,
)
from pagedllm.entrypoints.openai.dashboard import Dashboard
from pagedllm.entrypoints.openai.serving_base import (
    APIError, OpenAIServing, internal_error, json_response, read_json, until_disconnect,
)
from pagedllm.entrypoints.openai.lora import LoadLoRARequest, LoRARegistry, UnloadLoRARequest, parse_lora_modules
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.serving_embedding import EmbeddingServing
from pagedllm.entrypoints.openai.serving_completion import CompletionServing
from pagedllm.entrypoints.openai.serving_pooling import PoolingServing
from pagedllm.metrics import ServerMetrics

logger = logging.getLogger("pagedllm.server")
T = TypeVar("T", bound=BaseModel)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Reachable without the API key: the dashboard's page holds no data (a browser cannot send a Bearer header when it
# opens a page); its stream, which does, stays behind the key (the page sends the key given as #key=...).
OPEN_PATHS = frozenset({"/health", "/version", "/dashboard"})


class ServerSettings(BaseModel):
    model_names: list[str]
    model_path: str | None = None
    api_key: str | None = None
    max_n: int = 16
    max_request_body_bytes: int = 8 << 20
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    lora_modules: dict[str, str] = {}  # name -> PEFT directory, loaded at start (--lora-modules)
    allow_runtime_lora_updating: bool = False
    dashboard: bool = True  # GET /dashboard (--no-dashboard: off)


class _Guard:
    """API-key check (constant-time) and the drain gate, as plain ASGI so streaming is untouched."""

    def __init__(self, app: ASGIApp, api_key: str | None, fastapi_app: FastAPI) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            error = None
            if self.key is not None and not self._authorized(scope):
                error = APIError("Incorrect or missing API key: send `Authorization: Bearer <key>`.", 401, code="invalid_api_key")
            elif self.fastapi_app.state.draining:
                error = APIError("the server is shutting down.", 503, code="shutting_down")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.key is not None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest's time does not depend on where the bytes differ, so timing cannot leak the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def build_app(engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics | None = None) -> FastAPI:
    loras = LoRARegistry(settings.model_names)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        for name, path in settings.lora_modules.items():  # a bad adapter stops the server here, with its reason
            await loras.load(engine, name, path)
        yield
        await engine.shutdown()

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    app.state.draining = False
    app.state.engine = engine
    app.add_middleware(_Guard, api_key=settings.api_key, fastapi_app=app)
    completions = CompletionServing(engine, settings.model_names, settings.max_n)
    chats = ChatServing(engine, settings.model_names, settings.max_n, settings.enable_auto_tool_choice,
                        settings.tool_call_parser, settings.reasoning_parser)
    base = OpenAIServing(engine, settings.model_names, settings.max_n)
    embeddings = EmbeddingServing(engine, settings.model_names, settings.max_n)
    pooling = PoolingServing(engine, settings.model_names, settings.max_n)
    completions.loras = chats.loras = base.loras = embeddings.loras = pooling.loras = loras
    max_model_len = engine.config.max_model_len or 0

    async def handle(raw: Request, model: type[T], serve: Callable[[T, float], Awaitable[Response]]) -> Response:
        """Parses the body, runs `serve` until the client disconnects, and maps any failure to an error JSON."""
        arrival = time.time()
        try:
            body = await read_json(raw, model, settings.max_request_body_bytes)
            return await until_disconnect(raw, serve(body, arrival))
        except APIError as error:
            return error.response()
        except Exception:  # noqa: BLE001 - one request's failure must not touch the others
            logger.exception("request to %s failed", raw.url.path)
            return internal_error().response()

    @app.post("/v1/completions")
    async def create_completion(raw: Request) -> Response:
        return await handle(raw, CompletionRequest, completions.create)

    @app.post("/v1/embeddings")
    async def create_embedding(raw: Request) -> Response:
        return await handle(raw, EmbeddingRequest, embeddings.create)

    # vLLM's pooling endpoints, under each path vLLM serves them at (rerank: Jina's v1 and Cohere's v2 clients).
    @app.post("/score")
    @app.post("/v1/score")
    async def create_score(raw: Request) -> Response:
        return await handle(raw, ScoreRequest, pooling.score)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def create_rerank(raw: Request) -> Response:
        return await handle(raw, RerankRequest, pooling.rerank)

    @app.post("/classify")
    @app.post("/v1/classify")
    async def create_classify(raw: Request) -> Response:
        return await handle(raw, ClassificationRequest, pooling.classify)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw: Request) -> Response:
        return await handle(raw, ChatCompletionRequest, chats.create)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        cards = [ModelCard(id=name, root=settings.model_path, max_model_len=max_model_len) for name in settings.model_names]
        cards += [ModelCard(id=name, root=lora.lora_path, parent=settings.model_names[0], max_model_len=max_model_len)
                  for name, lora in loras.by_name.items()]
        return ModelList(data=cards)

    if settings.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(raw: Request) -> Response:
            try:
                body = await read_json(raw, LoadLoRARequest, settings.max_request_body_bytes)
                await loras.load(engine, body.lora_name, body.lora_path)
            except APIError as error:
                return error.response()
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(raw: Request) -> Response:
            try:
                body = await read_json(raw, UnloadLoRARequest, settings.max_request_body_bytes)
                await loras.unload(engine, body.lora_name)
            except APIError as error:
                return error.response()
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return APIError(f"the engine loop is not running ({engine.error!r})", 503, code="engine_dead").response()

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        await engine.reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=pagedllm.__version__)

    if settings.dashboard:  # the stream behind the API key (the page holds no data); snapshots only while one reads
        dashboard = app.state.dashboard = Dashboard(engine)
        for front in getattr(engine, "replicas", [engine]):  # fed after every step, after the metrics' hook
            front.on_step = dashboard.hook(front.on_step)
        page = (Path(__file__).parent / "static" / "dashboard.html").read_text()

        @app.get("/dashboard")
        async def dashboard_page() -> Response:
            return HTMLResponse(page)

        @app.get("/dashboard/stream")
        async def dashboard_stream() -> Response:
            return StreamingResponse(dashboard.stream(lambda: app.state.draining), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        if metrics is None:
            return APIError("metrics are disabled.", 404).response()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def do_tokenize(request: TokenizeRequest, arrival: float) -> Response:
        base.check_model(request.model)
        if base.tokenizer is None:
            raise APIError("this server has no tokenizer (--skip-tokenizer-init).", 400)
        if request.messages is not None:
            ids = await chats.tokenize_messages(request)  # images expanded to their tokens
        elif request.prompt is not None:
            ids = base.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens).input_ids
        else:
            raise APIError("give either prompt or messages.", 400, param="prompt")
        return json_response(TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids))

    async def do_detokenize(request: DetokenizeRequest, arrival: float) -> Response:
        base.check_model(request.model)
        if base.tokenizer is None:
            raise APIError("this server has no tokenizer (--skip-tokenizer-init).", 400)
        bad = [t for t in request.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(f"tokens holds ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}.", 400, param="tokens")
        return json_response(DetokenizeResponse(prompt=base.tokenizer.decode(request.tokens)))

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> Response:
        return await handle(raw, TokenizeRequest, do_tokenize)

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> Response:
        return await handle(raw, DetokenizeRequest, do_detokenize)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        return APIError(str(error.detail), error.status_code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        return APIError(str(error), 400).response()

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> Response:
        return internal_error().response()

    return app


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: `serve` installs the draining handlers instead (uvicorn's would
    re-raise SIGTERM at exit and end the process with a signal rather than 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(server: _Server, app: FastAPI, engine: AsyncLLM, shutdown_timeout: float) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if app.state.draining:  # a second signal: stop waiting
            logger.warning("%s again: aborting every request now", sig.name)
            engine.abort_all()
            return
        logger.info("%s: draining, in-flight requests have %.0f s to finish", sig.name, shutdown_timeout)
        app.state.draining = True
        server.should_exit = True  # uvicorn closes the listening socket and waits for open connections
        loop.call_later(shutdown_timeout, engine.abort_all)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.serve()


def run_server(args: argparse.Namespace) -> None:
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.cli import engine_kwargs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = EngineConfig.from_kwargs(**engine_kwargs(args))
    engine_config.finalize()
    names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    max_model_len = engine_config.max_model_len or 0
    metrics = ServerMetrics(names[0], max_model_len, engine_config.max_loras if engine_config.enable_lora else 0)
    capacity = engine_config.max_num_seqs + args.max_waiting_requests
    if engine_config.data_parallel_size > 1:  # replicas in processes of their own, each bounded by `capacity`
        from pagedllm.engine.data_parallel import DPAsyncLLM

        async_engine = DPAsyncLLM.create(engine_config, capacity, metrics.record_step)
    else:
        async_engine = AsyncLLM.create(engine_config, capacity, metrics.record_step)
    settings = ServerSettings(
        model_names=names, model_path=engine_config.model_path, api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        max_n=args.max_n, max_request_body_bytes=args.max_request_body_bytes,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=engine_config.reasoning_parser, lora_modules=parse_lora_modules(args.lora_modules),
        allow_runtime_lora_updating=args.allow_runtime_lora_updating
        or os.environ.get("PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        dashboard=not args.no_dashboard,
    )
    if (settings.lora_modules or settings.allow_runtime_lora_updating) and not engine_config.enable_lora:
        raise SystemExit("--lora-modules and runtime LoRA updating need --enable-lora.")
    app = build_app(async_engine, settings, metrics)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, lifespan="on",
        # A backstop only: our own timer aborts the stragglers at shutdown_timeout, which ends their responses.
        timeout_graceful_shutdown=int(args.shutdown_timeout) + 10,
    )
    logger.info("serving %s (max_model_len %d) on http://%s:%d", names[0], max_model_len, args.host, args.port)
    asyncio.run(_serve(_Server(config), app, async_engine, args.shutdown_timeout))
    # Spawning the engine core started multiprocessing's resource tracker: stop and reap it too, so that nothing
    # of the server outlives it (the tracker would exit only after us, and linger as a zombie).
    stop_tracker = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop_tracker is not None:
        stop_tracker()
