"""What media a server or an `LLM` may load, and how much: `MediaPolicy` (from the engine config and the environment),
the per-prompt item limits (`limit_mm_per_prompt`, as vLLM's) and `MediaError`, which every refusal raises.

Environment (as vLLM's VLLM_* variables):
  PAGEDLLM_IMAGE_FETCH_TIMEOUT         seconds for one http(s) fetch, redirects included (default 5)
  PAGEDLLM_MEDIA_MAX_BYTES             largest encoded image, from any source (default 20 MiB)
  PAGEDLLM_MAX_IMAGE_PIXELS            largest decoded image, width x height (default 2**25: 8K fits)
  PAGEDLLM_MEDIA_URL_ALLOW_REDIRECTS   follow redirects, each hop checked like the first (default 1)
  PAGEDLLM_MEDIA_URL_ALLOW_PRIVATE_IPS fetch from loopback / private / link-local addresses too (default 0; tests
                                       and trusted networks only: it lets clients reach what the server can)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class MediaError(ValueError):
    """Media that cannot be loaded; the message says why (the server answers it as a 400 on `messages`)."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}.") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}.")
    return value


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class MediaPolicy:
    fetch_timeout: float = 5.0
    max_bytes: int = 20 << 20
    max_pixels: int = 1 << 25
    allowed_local_media_path: str | None = None  # a real (resolved) directory: file:// URLs only from inside it
    allowed_media_domains: frozenset[str] | None = None  # None: any host (that resolves to public addresses)
    allow_private_ips: bool = False
    allow_redirects: bool = True
    max_redirects: int = 5

    @classmethod
    def from_config(cls, config: Any = None) -> MediaPolicy:
        """The policy of an engine config (its allowed_local_media_path and allowed_media_domains; None or a
        config without them: neither) with the limits from the environment."""
        return cls(
            fetch_timeout=_env_number("PAGEDLLM_IMAGE_FETCH_TIMEOUT", 5.0),
            max_bytes=int(_env_number("PAGEDLLM_MEDIA_MAX_BYTES", 20 << 20)),
            max_pixels=int(_env_number("PAGEDLLM_MAX_IMAGE_PIXELS", 1 << 25)),
            allowed_local_media_path=local_media_root(getattr(config, "allowed_local_media_path", None)),
            allowed_media_domains=parse_media_domains(getattr(config, "allowed_media_domains", None)),
            allow_private_ips=_env_flag("PAGEDLLM_MEDIA_URL_ALLOW_PRIVATE_IPS", False),
            allow_redirects=_env_flag("PAGEDLLM_MEDIA_URL_ALLOW_REDIRECTS", True),
        )


def local_media_root(path: str | None) -> str | None:
    """--allowed-local-media-path resolved (symlinks too), so that containment is checked on real paths."""
    if path is None or path == "":
        return None
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(real):
        raise ValueError(f"allowed_local_media_path must be an existing directory, got {path!r}.")
    return real


def parse_media_domains(value: Any) -> frozenset[str] | None:
    """--allowed-media-domains: host names, as a list or one comma- or space-separated string; None: any host."""
    if value is None or value == "":
        return None
    names = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise ValueError(f"allowed_media_domains must be host names, got {value!r}.")
    return frozenset(name.strip().rstrip(".").lower() for name in names)


def parse_mm_limits(value: Any) -> dict[str, int] | None:
    """--limit-mm-per-prompt: the most items of each modality one prompt may hold, as a dict or its JSON
    ('{"image": 2}'); None: no limit (a modality left out has none either)."""
    value = _json_object(value, "limit_mm_per_prompt", '{"image": 2}', "modalities to counts")
    if value is None:
        return None
    for modality, count in value.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"limit_mm_per_prompt[{modality!r}] must be an integer >= 0, got {count!r}.")
    return dict(value)


def parse_processor_kwargs(value: Any) -> dict[str, Any] | None:
    """--mm-processor-kwargs (or a request's): settings for the image processor, as a dict or its JSON."""
    return _json_object(value, "mm_processor_kwargs", '{"max_pixels": 802816}', "setting names to values")


def _json_object(value: Any, name: str, example: str, what: str) -> dict[str, Any] | None:
    """An option given as a dict or its JSON, keyed by strings; None when unset (None or "")."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{name} must be JSON such as {example}, got {value!r}.") from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must map {what}, such as {example}; got {value!r}.")
    return dict(value)


def check_mm_limits(counts: Mapping[str, int], limits: Mapping[str, int] | None) -> None:
    """Refuses a prompt with more items of a modality than `limits` allows, before anything is fetched."""
    for modality, count in counts.items():
        limit = None if limits is None else limits.get(modality)
        if limit is not None and count > limit:
            raise MediaError(f"at most {limit} {modality}(s) may be given per prompt (limit_mm_per_prompt "
                             f"{json.dumps(dict(limits or {}))}); this one has {count}.")


def takes_images(hf_config: Any) -> bool:
    """Whether the model reads images: vision-language configs (Qwen2-VL, LLaVA) carry a vision_config."""
    return getattr(hf_config, "vision_config", None) is not None


def check_takes_media(hf_config: Any, modalities: Iterable[str]) -> None:
    """Refuses media for a text-only model, before any is fetched (its template would not place them anyway)."""
    kinds = " or ".join(modalities)
    if kinds and not takes_images(hf_config):
        model = ", ".join(getattr(hf_config, "architectures", None) or ["this model"])
        raise MediaError(f"multi_modal_data: {model} is a text-only model; it takes no {kinds} inputs.")


def check_media_options(config: Any) -> None:
    """Normalizes an engine config's media fields in place, so that a bad value fails when the engine starts."""
    config.limit_mm_per_prompt = parse_mm_limits(config.limit_mm_per_prompt)
    config.mm_processor_kwargs = parse_processor_kwargs(getattr(config, "mm_processor_kwargs", None))
    config.allowed_local_media_path = local_media_root(config.allowed_local_media_path)
    domains = parse_media_domains(config.allowed_media_domains)
    config.allowed_media_domains = None if domains is None else sorted(domains)
