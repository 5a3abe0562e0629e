"""Images from what clients send, as vLLM takes them: `data:` URLs (base64 PNG, JPEG, WebP, GIF, BMP), http(s) URLs
(fetch.py: refused for anything but public addresses, under a deadline and a size cap) and `file://` URLs, only
from inside --allowed-local-media-path (real paths: a symlink out of it is refused). Every image is decoded with PIL,
restricted to those five formats (no other decoder ever runs), under a pixel cap, into RGB.

Every refusal is a `MediaError` (a ValueError) naming the image and what was wrong with it. PIL and httpcore are
imported when the first image is loaded, not with pagedllm.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import os
import stat
import warnings
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit

from pagedllm.multimodal.policy import MediaError, MediaPolicy, check_mm_limits

__all__ = ["MediaError", "MediaPolicy", "check_mm_limits", "decode_image", "load_images", "load_images_async"]

IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG's opener also reads MPO, as phone cameras write


def describe(url: str) -> str:
    """`url` short enough to quote back in an error (a data URL only up to its media type)."""
    if url[:5].lower() == "data:":
        return url.split(",", 1)[0] + ",..."
    return url if len(url) <= 100 else url[:97] + "..."


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image `data:` URL."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError("a data URL needs a comma between its media type and its data.")
    fields = [f.strip().lower() for f in header.split(";")]
    if fields[0] not in IMAGE_MEDIA_TYPES:
        raise MediaError(f"data URL media type {fields[0] or 'none'!r} is not an image type taken here "
                         f"({', '.join(IMAGE_MEDIA_TYPES)}).")
    if "base64" not in fields[1:]:
        raise MediaError("image data URLs must be base64: data:image/png;base64,...")
    payload = "".join(payload.split())  # some encoders break lines
    if len(payload) // 4 * 3 > max_bytes:
        raise MediaError(f"the image is larger than {max_bytes} bytes.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL's data is not valid base64.") from None


def local_file_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes of a `file://` URL whose real path lies inside the allowed directory."""
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaError("file:// URLs are refused without --allowed-local-media-path (allowed_local_media_path).")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("a file:// URL must name a local path: file:///path/to/image.png")
    path = unquote(parts.path)
    real = os.path.realpath(path)  # symlinks resolved, so a link out of the directory is caught here
    if os.path.commonpath([real, root]) != root:
        raise MediaError(f"{path} is outside --allowed-local-media-path.")
    try:  # no following a link swapped in since, and no blocking on a FIFO
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise MediaError(f"cannot open {path}: {error.strerror}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"{path} is not a regular file.")
        if info.st_size > policy.max_bytes:
            raise MediaError(f"the image is {info.st_size} bytes; the limit is {policy.max_bytes}.")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as error:
        raise MediaError(f"cannot read {path}: {error.strerror}.") from None
    finally:
        os.close(fd)
    if len(data) > policy.max_bytes:
        raise MediaError(f"the image is larger than {policy.max_bytes} bytes.")
    return data


def decode_image(data: bytes, max_pixels: int) -> Any:
    """`data` as an RGB PIL image; refuses what is no image of the taken formats, and images over `max_pixels`
    (checked from the header, before the pixels are decoded: a small file may claim a huge image)."""
    from PIL import Image, UnidentifiedImageError

    Image.init()
    formats = [name for name in _PIL_FORMATS if name in Image.OPEN]  # WebP only where PIL was built with it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's bomb warning (our own cap applies) and palette notes
        try:
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels.")
            return image.convert("RGB")  # decodes (the first frame of an animation)
        except Image.DecompressionBombError as error:  # PIL's own cap, past twice Image.MAX_IMAGE_PIXELS
            raise MediaError(f"the image is too large to decode ({error}); the limit is {max_pixels} pixels.") from None
        except UnidentifiedImageError:
            raise MediaError(f"the data is not an image in a format taken here ({', '.join(formats)}).") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
            if isinstance(error, MediaError):
                raise
            raise MediaError(f"the image could not be decoded: {error}") from None


async def _load(index: int, url: str, policy: MediaPolicy, pool: Any) -> Any:
    try:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = data_url_bytes(url, policy.max_bytes)
        elif scheme in ("http", "https"):
            from pagedllm.multimodal.fetch import fetch_bytes

            data = await fetch_bytes(url, policy, pool)
        elif scheme == "file":
            data = await asyncio.to_thread(local_file_bytes, url, policy)
        else:
            raise MediaError(f"URL scheme {scheme or 'none'!r} is not taken; use a data: URL or http(s)"
                             + (", or file:// inside --allowed-local-media-path." if policy.allowed_local_media_path
                                else "."))
        return await asyncio.to_thread(decode_image, data, policy.max_pixels)  # off the event loop
    except MediaError as error:
        raise MediaError(f"image {index + 1} ({describe(url)}): {error}") from None


async def load_images_async(urls: Sequence[str], policy: MediaPolicy) -> list[Any]:
    """The images of `urls` in order, loaded concurrently; the first failure cancels the rest."""
    pool = None
    if any(url[:4].lower() == "http" for url in urls):
        from pagedllm.multimodal.fetch import new_pool

        pool = new_pool(policy)
    tasks = [asyncio.ensure_future(_load(i, url, policy, pool)) for i, url in enumerate(urls)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pool is not None:
            await pool.aclose()


def load_images(urls: Sequence[str], policy: MediaPolicy) -> list[Any]:
    """load_images_async for synchronous callers (LLM.chat); in a thread of its own if this one runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True  # e.g. called from a notebook's running loop, which asyncio.run cannot share
    if not in_loop:
        return asyncio.run(load_images_async(urls, policy))
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, load_images_async(urls, policy)).result()
