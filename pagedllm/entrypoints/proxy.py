"""`pagedllm proxy`: one OpenAI-compatible address in front of prefill and decode instances (disaggregated prefill).

Why: a long prompt's prefill stalls the decode steps batched with it. Prefill instances (`pagedllm serve
--kv-transfer-config '{"kv_connector": "TcpConnector", "kv_role": "kv_producer", "kv_port": P}'`) compute prompts,
decode instances (kv_role "kv_consumer") pull those prompts' KV blocks (kv_transfer/: over TCP, or copied straight
from the producer's pool with the IpcConnector on one host) and only decode.
This proxy runs the exchange, as vLLM's P/D proxy does:
1. the request goes to a prefill instance with max_tokens 1, stream false and kv_transfer_params
   {"do_remote_decode": true}; the answer's kv_transfer_params say where the KV waits;
2. the original request goes to a decode instance with those kv_transfer_params; its answer (the SSE bytes of a
   stream) goes back to the client unchanged.
A prefill instance whose params say "streamed" (the IpcConnector) gets later requests at the same time as their decode
instance, both with one new "transfer_id": the consumer pulls each part of the prompt's KV as the producer computes
it, layer by layer, instead of after the prefill's answer.
A failed prefill (unreachable, 5xx, timeout) costs only speed: the decode instance gets the request without
kv_transfer_params and prefills it itself; a 4xx is the request's fault and goes back to the client. Each request
goes to the instance with the fewest requests in flight (ties in turn). A client that leaves closes the upstream
connections, so the instances abort the request. GET /health is 200 while a prefill and a decode instance answer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator, Callable

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("pagedllm.proxy")
FORWARDED_HEADERS = ("authorization",)  # the instances' --api-key


class Pool:
    """Instances of one role: `acquire` takes the one with the fewest requests in flight (ties in turn), skipping those
    that refused a connection (or answered 503) in the last `cooldown` seconds: a dead prefill instance costs one
    attempt, not one per request."""

    def __init__(self, urls: list[str], cooldown: float = 5.0) -> None:
        self.urls = list(dict.fromkeys(url.rstrip("/") for url in urls))
        self.in_flight = dict.fromkeys(self.urls, 0)
        self.down_until = dict.fromkeys(self.urls, 0.0)
        self.cooldown, self._next = cooldown, 0

    def acquire(self, only_up: bool = False) -> str | None:
        """None only with only_up, when every instance is down; otherwise the least loaded, down or not."""
        order = self.urls[self._next:] + self.urls[:self._next]
        up = [url for url in order if self.down_until[url] <= time.monotonic()]
        if not up and only_up:
            return None
        url = min(up or order, key=self.in_flight.__getitem__)  # min keeps the first of equals: the turn decides ties
        self._next = (self.urls.index(url) + 1) % len(self.urls)
        self.in_flight[url] += 1
        return url

    def release(self, url: str, down: bool = False) -> None:
        self.in_flight[url] -= 1
        if down:
            self.down_until[url] = time.monotonic() + self.cooldown


def error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def relayed(answer: httpx.Response, content: bytes) -> Response:
    return Response(content, answer.status_code, media_type=answer.headers.get("content-type"))


async def disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Relay(Response):
    """An upstream stream's bytes, as they come; raced against the client's disconnect, and always closed (so the
    decode instance sees its connection drop and aborts the request) and released from its pool."""

    def __init__(self, upstream: httpx.Response, release: Callable[[], None]) -> None:
        self.status_code, self.background = upstream.status_code, None
        self.init_headers({"content-type": upstream.headers.get("content-type", "text/event-stream"),
                           "cache-control": "no-cache", "x-accel-buffering": "no"})
        self.upstream, self.release = upstream, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.upstream.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(disconnect(receive))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, httpx.HTTPError):  # the decode instance broke off: the client's stream ends short
                    logger.warning("decode stream from %s failed: %r", self.upstream.url, outcome)
            await self.upstream.aclose()
            self.release()


def build_proxy(prefill: list[str], decode: list[str], prefill_timeout: float = 300.0,
                transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    prefills, decodes = Pool(prefill), Pool(decode)
    # No overall timeout: streams and long generations last as long as they last; connecting must not hang, though.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), transport=transport,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="pagedllm proxy", lifespan=lifespan)
    app.state.prefills, app.state.decodes = prefills, decodes

    streamed: dict[str, dict[str, Any]] = {}  # a prefill instance's kv_transfer_params, when they say "streamed"
    background: set[asyncio.Task[Any]] = set()  # prefills that go on while their decode answers

    async def prefill(url: str, path: str, body: dict[str, Any], headers: dict[str, str],
                      transfer_id: str | None = None) -> dict[str, Any] | Response | None:
        """The prefill instance's kv_transfer_params; a Response to give the client (a 4xx); None if it failed."""
        params: dict[str, Any] = {"do_remote_decode": True}
        if transfer_id is not None:
            params["transfer_id"] = transfer_id
        body = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": params}
        body.pop("stream_options", None)
        if path.endswith("/chat/completions"):
            body["max_completion_tokens"] = 1
        down = False
        try:
            answer = await client.post(url + path, json=body, headers=headers, timeout=prefill_timeout)
            if 400 <= answer.status_code < 500:
                return relayed(answer, answer.content)
            down = answer.status_code == 503  # engine dead or draining
            answer.raise_for_status()
            data = answer.json()
            params = data.get("kv_transfer_params") if isinstance(data, dict) else None
            if not isinstance(params, dict):
                return None
            if params.get("streamed"):
                streamed[url] = params
            return params
        except (httpx.HTTPError, ValueError) as failure:
            down = down or isinstance(failure, (httpx.ConnectError, httpx.ConnectTimeout))
            logger.warning("prefill on %s failed (%r): the decode instance prefills itself", url, failure)
            return None
        finally:
            prefills.release(url, down)

    async def prefill_alongside(url: str, path: str, body: dict[str, Any], headers: dict[str, str],
                                transfer_id: str) -> None:
        """A prefill whose decode went out at once (its KV streams to the consumer as it is computed): a failure only
        costs speed, the consumer prefills what it did not get."""
        outcome = await prefill(url, path, body, headers, transfer_id)
        if isinstance(outcome, Response):
            logger.warning("prefill on %s refused the request (%d): the decode instance prefills it itself",
                           url, outcome.status_code)

    async def generate(raw: Request) -> Response:
        """Prefill, then decode, unless the client leaves first: then both are cancelled (closing their connections
        aborts the requests upstream)."""
        try:
            body = await raw.json()
        except ValueError as bad:
            return error(400, f"malformed JSON body: {bad}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object.")
        headers = {name: raw.headers[name] for name in FORWARDED_HEADERS if name in raw.headers}
        work = asyncio.ensure_future(exchange(raw.url.path, body, headers))
        gone = asyncio.ensure_future(disconnect(raw.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with suppress(asyncio.CancelledError):
                    await work
        return Response(status_code=499) if work.cancelled() else work.result()

    async def exchange(path: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """Prefill, then decode with the producer's kv_transfer_params; with an instance known to stream (the
        IpcConnector) both at once, tied by a transfer id, so that the consumer's pull overlaps the prefill."""
        url, params, task = prefills.acquire(only_up=True), None, None
        if url is not None and url in streamed:
            transfer_id = uuid.uuid4().hex
            task = asyncio.ensure_future(prefill_alongside(url, path, body, headers, transfer_id))
            background.add(task)
            task.add_done_callback(background.discard)
            params = {**streamed[url], "transfer_id": transfer_id}
        elif url is not None:
            params = await prefill(url, path, body, headers)
            if isinstance(params, Response):
                return params
        body = {key: value for key, value in body.items() if key != "kv_transfer_params"}
        if params is not None:
            body["kv_transfer_params"] = params
        try:
            return await decode(path, body, headers)
        except asyncio.CancelledError:  # the client left: the prefill of its prompt is not needed either
            if task is not None:
                task.cancel()
            raise

    async def decode(path: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        for attempt in range(len(decodes.urls)):  # a refused connection never reached the instance: try the next one
            url = decodes.acquire()
            assert url is not None
            try:
                upstream = await client.send(client.build_request("POST", url + path, json=body, headers=headers), stream=True)
                break
            except httpx.HTTPError as failure:
                refused = isinstance(failure, (httpx.ConnectError, httpx.ConnectTimeout))
                decodes.release(url, down=refused)
                if not refused or attempt == len(decodes.urls) - 1:
                    return error(502, f"decode instance {url} failed: {failure!r}")
        if body.get("stream") and upstream.status_code == 200:
            return Relay(upstream, lambda: decodes.release(url))
        try:
            return relayed(upstream, await upstream.aread())
        except httpx.HTTPError as failure:
            return error(502, f"decode instance {url} failed: {failure!r}")
        finally:
            await upstream.aclose()
            decodes.release(url)

    app.post("/v1/completions")(generate)
    app.post("/v1/chat/completions")(generate)

    @app.get("/v1/models")
    async def models() -> Response:
        for url in decodes.urls:
            try:
                answer = await client.get(url + "/v1/models", timeout=10.0)
                return relayed(answer, answer.content)
            except httpx.HTTPError:
                continue
        return error(502, "no decode instance answers /v1/models.")

    @app.get("/health")
    async def health() -> Response:
        async def up(url: str) -> bool:
            try:
                return (await client.get(url + "/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                return False

        checks = await asyncio.gather(*(up(url) for url in prefills.urls + decodes.urls))
        prefill_up, decode_up = checks[:len(prefills.urls)], checks[len(prefills.urls):]
        if any(prefill_up) and any(decode_up):
            return Response(status_code=200)
        return error(503, f"instances up: prefill {sum(prefill_up)}/{len(prefill_up)}, decode {sum(decode_up)}/{len(decode_up)}.")

    return app


def run_proxy(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_proxy(args.prefill, args.decode, args.prefill_timeout)
    logger.info("proxy on http://%s:%d: prefill %s, decode %s", args.host, args.port, args.prefill, args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
