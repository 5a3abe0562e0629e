"""Chat messages as chat templates take them, for the server and `LLM.chat` alike.

OpenAI's content parts are text and `image_url` ({"type": "image_url", "image_url": {"url": ...}}); offline,
`LLM.chat` also takes vLLM's {"type": "image_pil", "image_pil": <PIL image>}. A message without images keeps its text
parts joined into one string, so text-only templates see what they always saw; a message with images becomes a list
of {"type": "text", "text": ...} and {"type": "image"} parts, as multimodal templates (Qwen2-VL, LLaVA) expect, each
image part rendered as the model's placeholder. The images come back separately, in the order of their
placeholders: URLs to be loaded (pagedllm/multimodal/media.py), PIL images as they are.
"""

from __future__ import annotations

from typing import Any


def template_content(content: Any, allow_pil: bool = False) -> tuple[str | list[dict[str, Any]], list[Any]]:
    """A message's content for the template, and its images in order (URLs, and with `allow_pil` PIL images);
    ValueError for a part not taken."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError("messages: a message's content must be a string or a list of content parts.")
    parts: list[dict[str, Any]] = []
    urls: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url:
                raise ValueError('messages: an image_url part needs {"image_url": {"url": "..."}}.')
            parts.append({"type": "image"})
            urls.append(url)
        elif kind == "image_pil" and allow_pil:
            image = part.get("image_pil")
            if not hasattr(image, "convert"):
                raise ValueError('messages: an image_pil part needs {"image_pil": <a PIL image>}.')
            parts.append({"type": "image"})
            urls.append(image)
        else:
            taken = "text, image_url or image_pil" if allow_pil else "text or image_url"
            raise ValueError(f"messages: content parts of type {kind!r} are not supported; use {taken}.")
    if not urls:
        return "".join(part["text"] for part in parts), []
    return parts, urls


def template_message(message: dict[str, Any], allow_pil: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """`message` as templates expect it (an assistant turn of only tool calls still has content), and its images."""
    content, urls = template_content(message.get("content"), allow_pil)
    return {**message, "content": content}, urls


def template_conversation(messages: list[dict[str, Any]],
                          allow_pil: bool = False) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every message for the template, and the conversation's images in order (see template_content)."""
    rendered, urls = [], []
    for message in messages:
        out, found = template_message(message, allow_pil)
        rendered.append(out)
        urls += found
    return rendered, urls
