"""Image inputs (pagedllm/multimodal/): data URLs, decoding limits, SSRF refusals, fetching from a loopback HTTP
server (size cap while streaming, deadline, redirects, pinned addresses), local files under
--allowed-local-media-path; then the server's 400s on the text-only SmolLM2 and `LLM.chat` offline.

No test connects anywhere but 127.0.0.1: the `dialled` fixture fails any other connection, so a refusal that
regressed could not send traffic to the addresses below.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import httpcore
import pytest
from openai import APIStatusError
from PIL import Image

from pagedllm.entrypoints.chat_utils import template_content
from pagedllm.multimodal import fetch
from pagedllm.multimodal.media import MediaError, MediaPolicy, decode_image, load_images
from pagedllm.multimodal.policy import check_media_options, check_mm_limits, local_media_root, parse_mm_limits
from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

OPEN = MediaPolicy(allow_private_ips=True)  # for the loopback test server only


def encoded(fmt: str = "PNG", size: tuple[int, int] = (7, 5), mode: str = "RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 10, 255)[: len(mode)]).save(buf, fmt)
    return buf.getvalue()


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def load_one(url: str, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    return load_images([url], policy)[0]


def refused(url: str, policy: MediaPolicy = MediaPolicy()) -> str:
    with pytest.raises(MediaError) as info:
        load_one(url, policy)
    return str(info.value)


@pytest.fixture(autouse=True)
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the fetcher connects to; anything but 127.0.0.1 fails the test before a packet is sent."""
    hosts: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def guarded(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        hosts.append(host)
        assert host == "127.0.0.1", f"the fetcher tried to connect to {host}"
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", guarded)
    return hosts


# ---- data URLs and decoding -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("JPEG", "image/jpg"),
                                             ("GIF", "image/gif"), ("BMP", "image/bmp"), ("WEBP", "image/webp")])
def test_data_urls_decode_to_rgb(fmt: str, media_type: str) -> None:
    image = load_one(data_url(encoded(fmt, mode="RGB" if fmt in ("JPEG", "BMP") else "RGBA"), media_type))
    assert (image.size, image.mode) == ((7, 5), "RGB")
    if fmt == "PNG":
        assert image.getpixel((0, 0)) == (200, 30, 10)


def test_data_url_with_line_breaks_and_in_order() -> None:
    wrapped = base64.encodebytes(encoded(size=(3, 2))).decode()  # 76-column lines, as some encoders write
    images = load_images([f"data:image/png;base64,{wrapped}", data_url(encoded(size=(1, 4)))], MediaPolicy())
    assert [i.size for i in images] == [(3, 2), (1, 4)]


@pytest.mark.parametrize("url, why", [
    ("data:image/png;base64,iVBORw0K@@@", "not valid base64"),
    ("data:image/png;base64,abc", "not valid base64"),  # bad padding
    ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", "not an image type"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64", "needs a comma"),
    (data_url(b"hello, not an image"), "not an image in a format taken here"),
    (data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n"), "not an image in a format taken here"),  # no Ghostscript behind PIL
    (data_url(noise_png()[:400]), "could not be decoded"),  # truncated
])
def test_bad_data_urls(url: str, why: str) -> None:
    message = refused(url)
    assert why in message and message.startswith("image 1 (data:")


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: what decoding would allocate, from a few dozen bytes."""
    png = bytearray(encoded(size=(1, 1)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_decompression_bombs_are_refused_from_the_header() -> None:
    assert "10000x10000 pixels; the limit is 33554432" in refused(data_url(bomb_png(10_000, 10_000)))
    message = refused(data_url(bomb_png(50_000, 50_000)))  # past PIL's own cap: refused by it, in open()
    assert "too large to decode" in message and "2500000000 pixels" in message
    image = encoded(size=(40, 40))
    assert decode_image(image, 1600).size == (40, 40)
    with pytest.raises(MediaError, match="40x40 pixels; the limit is 1599"):
        decode_image(image, 1599)


def test_size_limit_applies_to_data_urls() -> None:
    big = encoded(size=(64, 64), mode="RGB")
    assert "larger than 100 bytes" in refused(data_url(big), MediaPolicy(max_bytes=100))


# ---- schemes and addresses -----------------------------------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("ftp://example.com/cat.png", "scheme 'ftp'"),
    ("javascript:alert(1)", "scheme 'javascript'"),
    ("gopher://127.0.0.1:70/x", "scheme 'gopher'"),
    ("/etc/passwd", "scheme 'none'"),
    ("file:///etc/passwd", "refused without --allowed-local-media-path"),
])
def test_schemes_refused(url: str, why: str, dialled: list[str]) -> None:
    assert why in refused(url)
    assert dialled == []


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1/x.png", "127.0.0.1 (a loopback address)"),
    ("http://127.1.2.3:8080/x.png", "a loopback address"),
    ("http://2130706433/x.png", "127.0.0.1 (a loopback address)"),  # decimal form of 127.0.0.1
    ("http://localhost/x.png", "localhost is the server itself"),
    ("http://api.localhost./x.png", "is the server itself"),
    ("http://0.0.0.0/x.png", "an unspecified address"),
    ("http://10.1.2.3/x.png", "a private address"),
    ("http://172.16.0.1/x.png", "a private address"),
    ("https://192.168.1.1/x.png", "a private address"),
    ("http://100.64.0.1/x.png", "a non-public address"),
    ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
    ("http://224.0.0.1/x.png", "a multicast address"),
    ("http://240.0.0.1/x.png", "a reserved address"),
    ("http://[::1]:8000/x.png", "::1 (a loopback address)"),
    ("http://[::]/x.png", "an unspecified address"),
    ("http://[fe80::1]/x.png", "a link-local address"),
    ("http://[fd00::1]/x.png", "a private address"),
    ("http://[ff02::1]/x.png", "a multicast address"),
    ("http://[::ffff:127.0.0.1]/x.png", "carries 127.0.0.1 (a loopback address)"),
    ("http://[::ffff:169.254.169.254]/x.png", "carries 169.254.169.254 (a link-local address)"),
    ("http://[::ffff:10.0.0.1]/x.png", "carries 10.0.0.1 (a private address)"),
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "carries 169.254.169.254"),  # NAT64
    ("http://[2002:7f00:1::]/x.png", "carries 127.0.0.1"),  # 6to4
])
def test_private_addresses_refused(url: str, why: str, dialled: list[str]) -> None:
    message = refused(url)
    assert why in message and "media URLs must point to public addresses" in message
    assert dialled == []


def test_public_addresses_pass_the_check() -> None:
    assert [fetch.address_error(a) for a in ("8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808")] \
        == [None] * 4


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """The event loop's resolver answering `answers` (no real DNS); returns the names looked up."""
    looked_up: list[str] = []
    real = asyncio.base_events.BaseEventLoop.getaddrinfo

    async def getaddrinfo(self: Any, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return await real(self, host, port, *args, **kwargs)
        looked_up.append(host)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_name_with_any_private_answer_is_refused(monkeypatch: pytest.MonkeyPatch, dialled: list[str]) -> None:
    fake_dns(monkeypatch, {"mixed.test": ["93.184.215.14", "10.0.0.7"], "meta.test": ["169.254.169.254"]})
    assert "mixed.test resolves to 10.0.0.7 (a private address)" in refused("http://mixed.test/cat.png")
    assert "meta.test resolves to 169.254.169.254" in refused("https://meta.test/cat.png")
    assert dialled == []


def test_allowed_media_domains(dialled: list[str]) -> None:
    policy = MediaPolicy(allowed_media_domains=frozenset({"images.example.com"}))
    assert "not one of --allowed-media-domains (images.example.com)" in refused("http://evil.example.com/x.png", policy)
    assert dialled == []


# ---- a loopback HTTP server ------------------------------------------------------------------------------
class Images(http.server.BaseHTTPRequestHandler):
    """GET /img.png, /big (declared), /stream (no length, endless), /slow, /hang, /missing, /redirect?to=URL, /loop."""

    state: dict[str, Any] = {}

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        self.state["hits"] = self.state.get("hits", 0) + 1
        self.state["host"] = self.headers.get("Host")
        if path in ("/redirect", "/loop"):
            self.send_response(302)
            self.send_header("Location", query["to"][0] if path == "/redirect" else "/loop")
            self.end_headers()
        elif path == "/img.png":
            self._send(encoded(size=(6, 4)))
        elif path == "/big":
            self._send(b"\0" * (3 << 20))
        elif path == "/stream":
            self._stream(64 << 20)
        elif path in ("/slow", "/hang"):
            time.sleep(3 if path == "/hang" else 0)
            self._drip()
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, total: int) -> None:
        self.send_response(200)
        self.end_headers()  # no Content-Length: the body runs until the connection closes
        self.state["streamed"] = 0
        try:
            while self.state["streamed"] < total:
                self.wfile.write(b"\0" * (64 << 10))
                self.state["streamed"] += 64 << 10
        except OSError:  # the client hung up
            pass
        self.state["stream_done"].set()

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


@pytest.fixture(scope="module")
def images() -> Iterator[tuple[str, dict[str, Any]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Images.state
    server.shutdown()
    server.server_close()


def test_fetch_from_loopback_with_the_opt_in(images: tuple[str, dict[str, Any]], dialled: list[str]) -> None:
    base, state = images
    image = load_one(f"{base}/img.png", OPEN)
    assert (image.size, image.mode) == ((6, 4), "RGB") and state["host"] == base.removeprefix("http://")
    assert "HTTP 404" in refused(f"{base}/missing.png", OPEN)
    assert "a loopback address" in refused(f"{base}/img.png")  # the default policy
    assert set(dialled) == {"127.0.0.1"}


def test_size_limit_from_the_declared_length(images: tuple[str, dict[str, Any]]) -> None:
    base, _ = images
    assert "is 3145728 bytes; the limit is 1048576" in refused(f"{base}/big", MediaPolicy(allow_private_ips=True,
                                                                                            max_bytes=1 << 20))


def test_size_limit_while_streaming(images: tuple[str, dict[str, Any]]) -> None:
    base, state = images
    state["stream_done"] = threading.Event()
    started = time.monotonic()
    assert "larger than 262144 bytes" in refused(f"{base}/stream", MediaPolicy(allow_private_ips=True,
                                                                                  max_bytes=256 << 10))
    assert time.monotonic() - started < 3
    assert state["stream_done"].wait(10)
    assert state["streamed"] < 16 << 20  # of 64 MiB: reading stopped at the cap (plus what the socket buffers held)


@pytest.mark.parametrize("path", ["/slow", "/hang"])  # a body that drips / headers that never come
def test_fetch_deadline(images: tuple[str, dict[str, Any]], path: str) -> None:
    base, _ = images
    started = time.monotonic()
    assert "longer than 0.5 s" in refused(base + path, MediaPolicy(allow_private_ips=True, fetch_timeout=0.5))
    assert time.monotonic() - started < 2.5


def test_redirects(images: tuple[str, dict[str, Any]]) -> None:
    base, _ = images
    assert load_one(f"{base}/redirect?to=/img.png", OPEN).size == (6, 4)
    assert "more than 5 redirects" in refused(f"{base}/loop", OPEN)
    no_redirects = MediaPolicy(allow_private_ips=True, allow_redirects=False)
    assert "redirects are not followed" in refused(f"{base}/redirect?to=/img.png", no_redirects)


@pytest.mark.parametrize("target, why", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (a link-local address)"),
    ("http://10.0.0.1/admin", "10.0.0.1 (a private address)"),
    ("http://[::1]:9/x", "::1 (a loopback address)"),
    ("http://localhost:9/x", "localhost is the server itself"),
    ("file:///etc/passwd", "URL scheme 'file' is not fetched"),
])
def test_redirects_to_private_addresses_are_refused(images: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                                    dialled: list[str], target: str, why: str) -> None:
    """The test server stands for a public host (127.0.0.1 passes the check here); where it redirects is checked
    like the first URL."""
    base, _ = images
    real = fetch.address_error
    monkeypatch.setattr(fetch, "address_error", lambda a: None if a == "127.0.0.1" else real(a))
    assert why in refused(f"{base}/redirect?to={target}")
    assert dialled == ["127.0.0.1"]  # the first hop only


def test_the_checked_address_is_the_one_dialled(images: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                                dialled: list[str]) -> None:
    """One lookup per name, in the backend; the socket goes to that answer's IP, the Host header keeps the name."""
    base, state = images
    port = urlsplit(base).port
    looked_up = fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    assert load_one(f"http://images.test:{port}/img.png", OPEN).size == (6, 4)
    assert looked_up == ["images.test"] and dialled == ["127.0.0.1"] and state["host"] == f"images.test:{port}"


# ---- local files --------------------------------------------------------------------------------------------
def test_local_files_only_inside_the_allowed_directory(tmp_path: Any) -> None:
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "cat.png").write_bytes(encoded(size=(2, 3)))
    (outside / "secret.png").write_bytes(encoded())
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "sub" / "cat.png")
    os.mkfifo(root / "fifo.png")
    policy = MediaPolicy(allowed_local_media_path=local_media_root(str(root)))
    assert load_one(f"file://{root}/sub/cat.png", policy).size == (2, 3)
    assert load_one(f"file://{root}/inner.png", policy).size == (2, 3)  # a link that stays inside
    assert load_one(f"file://localhost{root}/sub/cat%2Epng", policy).size == (2, 3)
    assert "outside --allowed-local-media-path" in refused(f"file://{outside}/secret.png", policy)
    assert "outside --allowed-local-media-path" in refused(f"file://{root}/escape.png", policy)
    assert "outside --allowed-local-media-path" in refused(f"file://{root}/sub/../../outside/secret.png", policy)
    assert "outside --allowed-local-media-path" in refused("file:///etc/passwd", policy)
    assert "not a regular file" in refused(f"file://{root}/fifo.png", policy)  # refused, without blocking
    assert "not a regular file" in refused(f"file://{root}/sub", policy)
    assert "cannot open" in refused(f"file://{root}/missing.png", policy)
    assert "must name a local path" in refused(f"file://otherhost{root}/sub/cat.png", policy)
    assert "refused without" in refused(f"file://{root}/sub/cat.png")


# ---- options, limits and content parts ------------------------------------------------------------------------
def test_options_and_limits(tmp_path: Any) -> None:
    assert parse_mm_limits('{"image": 2}') == {"image": 2} and parse_mm_limits(None) is None
    for bad in ('{"image": -1}', '{"image": "2"}', "[1]", "image=2", '{"image": true}'):
        with pytest.raises(ValueError, match="limit_mm_per_prompt"):
            parse_mm_limits(bad)
    check_mm_limits({"image": 2}, {"image": 2})
    check_mm_limits({"image": 5}, None)
    with pytest.raises(MediaError, match=r"at most 2 image\(s\) may be given per prompt .*this one has 3"):
        check_mm_limits({"image": 3}, {"image": 2})
    config = SimpleNamespace(limit_mm_per_prompt='{"image": 1}', allowed_local_media_path=str(tmp_path),
                             allowed_media_domains="A.example.com, b.example.com.")
    check_media_options(config)
    assert config.limit_mm_per_prompt == {"image": 1} and config.allowed_local_media_path == os.path.realpath(tmp_path)
    assert config.allowed_media_domains == ["a.example.com", "b.example.com"]
    with pytest.raises(ValueError, match="existing directory"):
        check_media_options(SimpleNamespace(limit_mm_per_prompt=None, allowed_media_domains=None,
                                            allowed_local_media_path=str(tmp_path / "nope")))


def test_template_content() -> None:
    assert template_content([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == ("ab", [])
    parts = [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": "u1"}},
             {"type": "image_url", "image_url": {"url": "u2", "detail": "low"}}]
    assert template_content(parts) == ([{"type": "text", "text": "What is"}, {"type": "image"}, {"type": "image"}],
                                       ["u1", "u2"])
    with pytest.raises(ValueError, match="'input_audio' are not supported"):
        template_content([{"type": "input_audio"}])
    with pytest.raises(ValueError, match="needs"):
        template_content([{"type": "image_url", "image_url": {}}])


# ---- the server: a stub engine with a vision config (what reaches the engine), then the real text-only SmolLM2 ----
VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
               "{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
               "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class StubVLEngine:
    """What build_app needs of an engine, with a vision-language config; it records each prompt and takes none."""

    def __init__(self, tokenizer: Any) -> None:
        hf_config = SimpleNamespace(vision_config={}, architectures=["StubVLForConditionalGeneration"])
        self.config = SimpleNamespace(runner="generate", max_model_len=256, hf_config=hf_config,
                                      limit_mm_per_prompt={"image": 2}, allowed_local_media_path=None,
                                      allowed_media_domains=["127.0.0.1"])
        self.tokenizer = tokenizer
        self.prompts: list[dict[str, Any]] = []

    async def add_request(self, request_id: str, prompt: dict[str, Any], *args: Any) -> None:
        self.prompts.append(prompt)
        raise ValueError("multi_modal_data: the stub engine generates nothing.")

    def abort(self, request_ids: Any) -> None:
        pass


@pytest.fixture(scope="module")
def vl_tokenizer(smollm2: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.chat_template = VL_TEMPLATE
    return tokenizer


def post_chat(engine: StubVLEngine, *urls: str, text: str = "What is this?") -> tuple[int, dict[str, Any]]:
    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app

    app = build_app(engine, ServerSettings(model_names=["vl"], dashboard=False))  # type: ignore[arg-type]
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    body = {"model": "vl", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}

    async def main() -> Any:
        import httpx

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vl") as http:
            return await http.post("/v1/chat/completions", json=body)

    response = asyncio.run(main())
    return response.status_code, response.json().get("error", {})


def test_server_loads_images_for_the_engine(vl_tokenizer: Any, images: tuple[str, dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch, dialled: list[str]) -> None:
    base, state = images
    monkeypatch.setenv("PAGEDLLM_MEDIA_URL_ALLOW_PRIVATE_IPS", "1")  # read when the app is built
    engine = StubVLEngine(vl_tokenizer)
    status, error = post_chat(engine, data_url(encoded(size=(7, 5))), f"{base}/img.png")
    assert (status, error["message"]) == (400, "messages: the stub engine generates nothing.")
    prompt = engine.prompts[0]
    assert [(i.size, i.mode) for i in prompt["multi_modal_data"]["image"]] == [((7, 5), "RGB"), ((6, 4), "RGB")]
    assert prompt["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert "What is this?" in prompt["prompt"]
    assert prompt["prompt_token_ids"] == vl_tokenizer(prompt["prompt"], add_special_tokens=False).input_ids
    assert dialled == ["127.0.0.1"]
    hits = state["hits"]
    status, error = post_chat(engine, *[f"{base}/img.png"] * 3)
    assert (status, error["param"]) == (400, "messages") and "at most 2 image(s)" in error["message"]
    assert state["hits"] == hits and len(engine.prompts) == 1  # refused before anything was fetched
    post_chat(engine)
    assert "multi_modal_data" not in engine.prompts[-1]  # text only: the prompt as before


@pytest.mark.parametrize("url, why", [
    ("data:image/png;base64,###", "messages: image 2 (data:image/png;base64,...): the data URL's data is not valid "
                                  "base64."),
    ("http://127.0.0.1:9/img.png", "the URL points to 127.0.0.1 (a loopback address)"),
    ("http://localhost:9/img.png", "the host 'localhost' is not one of --allowed-media-domains (127.0.0.1)"),
    ("file:///etc/passwd", "file:// URLs are refused"),
    ("ftp://127.0.0.1/img.png", "URL scheme 'ftp' is not taken"),
    (data_url(noise_png()[:300]), "the image could not be decoded"),
])
def test_server_media_errors_are_400s(vl_tokenizer: Any, url: str, why: str, dialled: list[str]) -> None:
    engine = StubVLEngine(vl_tokenizer)
    status, error = post_chat(engine, data_url(encoded()), url)
    assert (status, error["param"], error["type"]) == (400, "messages", "invalid_request_error")
    assert why in error["message"] and engine.prompts == [] and dialled == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    media = tmp_path_factory.mktemp("media")
    proc = ServerProcess([*SMALL_SERVER_ARGS, "--limit-mm-per-prompt", '{"image": 2}',
                          "--allowed-local-media-path", str(media), "--allowed-media-domains", "127.0.0.1"])
    yield proc
    assert proc.stop() == 0, proc.logs()


def chat_error(server: ServerProcess, *urls: str, part: dict[str, Any] | None = None) -> tuple[str, str | None]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls] + ([part] if part else [])
    with pytest.raises(APIStatusError) as info:
        messages: Any = [{"role": "user", "content": content}]
        server.client().chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=2, messages=messages)
    assert info.value.status_code == 400
    body = info.value.body if isinstance(info.value.body, dict) else {}
    return info.value.message, body.get("param")


def test_text_only_server_refuses_images(server: ServerProcess, images: tuple[str, dict[str, Any]]) -> None:
    """SmolLM2 takes no images: a 400 saying so, before anything is fetched or decoded; then it serves on."""
    base, state = images
    hits = state.get("hits", 0)
    text_only = "messages: LlamaForCausalLM is a text-only model; it takes no image inputs."
    for urls in ([data_url(encoded())], [f"{base}/img.png"], [data_url(encoded())] * 3, ["data:image/png;base64,#"]):
        message, param = chat_error(server, *urls)
        assert text_only in message and param == "messages"
    assert state.get("hits", 0) == hits
    message, param = chat_error(server, part={"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
    assert "content parts of type 'input_audio' are not supported" in message and param == "messages"
    # Still serving, and a list of text parts is one string to the template, as before.
    reply = server.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=3, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("length", "stop")


def test_cli_flags_reach_the_config(tmp_path: Any) -> None:
    import argparse

    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.cli import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--limit-mm-per-prompt", '{"image": 3}', "--allowed-local-media-path", str(tmp_path),
                              "--allowed-media-domains", "a.example.com,b.example.com"])
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    check_media_options(config)
    assert config.limit_mm_per_prompt == {"image": 3}
    assert config.allowed_media_domains == ["a.example.com", "b.example.com"]
    policy = MediaPolicy.from_config(config)
    assert policy.allowed_local_media_path == os.path.realpath(tmp_path) and not policy.allow_private_ips


def test_llm_chat_with_images(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm import LLM, SamplingParams

    llm = LLM(smollm2, kv_cache_memory=64 << 20, max_model_len=256, limit_mm_per_prompt={"image": 1})
    image = {"type": "image_url", "image_url": {"url": data_url(encoded())}}
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text-only model; it takes no image inputs"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}], use_tqdm=False)
    with pytest.raises(ValueError, match="text-only model"):  # the engine's own check, for prompts built by hand
        llm.generate({"prompt": "<image> What is this?", "multi_modal_data": {"image": [Image.new("RGB", (2, 2))]}},
                     use_tqdm=False)
    text = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    assert llm.chat(text, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    assert not llm.llm_engine.has_unfinished_requests()
    # As if the model read images: the prompt LLM.chat builds for the engine.
    monkeypatch.setattr(llm.llm_engine.config.hf_config, "vision_config", {}, raising=False)
    prompt = llm._chat_prompt([{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
                              VL_TEMPLATE, True, False)
    assert [i.size for i in prompt["multi_modal_data"]["image"]] == [(7, 5)]
    assert prompt["prompt"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?")
    with pytest.raises(MediaError, match="at most 1 image"):
        llm._chat_prompt([{"role": "user", "content": [image, image]}], VL_TEMPLATE, True, False)
    with pytest.raises(MediaError, match="image 1 .* not valid base64"):
        bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,#"}}
        llm._chat_prompt([{"role": "user", "content": [bad]}], VL_TEMPLATE, True, False)
