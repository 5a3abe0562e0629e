"""A smaller model with the target's vocabulary proposes k tokens per request, greedily.

It runs in a ModelRunner of its own (its CUDA graphs too) whose paged KV cache has as many blocks as the target's and
is indexed by the same block tables: a request's draft KV sits in the same block ids as its target KV, so allocation,
preemption and freeing need nothing of their own. The target's pool is sized for both (`kv_reservation`).

Per step and request: one forward over the tokens the draft has not seen (the whole context the first time or after a
preemption, then the tokens the last step accepted), whose last position gives the first draft, then k - 1 one-token
forwards, each feeding the previous draft. Drafts are the argmax (deterministic guesses, which spec_decode/decoder.py's
verification needs to stay exact). The draft writes KV for positions up to the last draft but one, so the request's
blocks are grown to cover them first; a prefix-cache block shared with another request gets the same draft KV it
already had (same tokens, same positions).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.engine.request import Request


def _draft_config(config: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.speculative_config.model)


def kv_reservation(config: Any) -> tuple[int, int]:
    """(bytes of the draft's weights, draft KV bytes per block) that the target's KV budget leaves to the draft (a
    draft model or an EAGLE head); (0, 0) without one. Computed from the configs alone, so every rank sizes its pool
    alike."""
    spec = config.speculative_config
    if spec is None or spec.method not in ("draft_model", "eagle", "eagle3"):
        return 0, 0
    hf = _draft_config(config)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    itemsize = config.torch_dtype.itemsize if config.kv_cache_dtype == "auto" else 1
    per_block = 2 * config.block_size * kv_heads * head_dim * itemsize * hf.num_hidden_layers
    model_dir = spec.model
    weights = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                  if f.endswith((".safetensors", ".bin", ".gguf")))
    return weights, per_block


@dataclass(eq=False)
class DraftView:
    """What the runner's batch building and sampling read of a request, for one draft (or EAGLE head) forward."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int
    num_pending: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: None = None
    structured_output: None = None
    pooling: None = None
    token_type_ids: None = None
    lora_request: None = None
    plain_greedy: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class DraftModelProposer:
    def __init__(self, config: Any, target_runner: Any, kv_cache: Any) -> None:
        from pagedllm.worker.model_runner import ModelRunner

        spec = config.speculative_config
        draft = dataclasses.replace(
            config, model=spec.model, tokenizer=None, quantization=None, speculative_config=None,
            num_gpu_blocks_override=target_runner.num_blocks, tensor_parallel_size=1, pipeline_parallel_size=1,
            hf_config=None, model_path=None, skip_tokenizer_init=True, async_scheduling=False, logits_processors=None)
        draft.finalize()
        if draft.hf_config.vocab_size > target_runner.vocab_size:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({draft.hf_config.vocab_size}) is larger "
                             f"than the target's ({target_runner.vocab_size}); a draft must share the target's tokenizer.")
        self.runner = ModelRunner(draft)
        self.k = spec.num_speculative_tokens
        self.budget = draft.max_num_batched_tokens
        self.kv_cache = kv_cache  # the engine's KVCacheManager: its tables index the draft's pool too
        self.seen: dict[str, tuple[int, int]] = {}  # request -> (its preemptions, tokens whose draft KV is valid)

    def propose_batch(self, batch: list[tuple[Request, int]], running: list[Request]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in batch]
        rows: list[tuple[int, Request, int, int]] = []  # (index, request, draft count, tokens the draft has seen)
        for i, (request, k) in enumerate(batch):
            # blocks for every position the draft writes (the last draft's is written by the target's step)
            if not self.kv_cache.allocate_slots(request.request_id, len(request.all_token_ids) + k - 1):
                continue
            preemptions, seen = self.seen.get(request.request_id, (-1, 0))
            rows.append((i, request, k, seen if preemptions == request.num_preemptions else 0))
        if not rows:
            return drafts
        # The tokens the draft has not seen, in chunks within its token budget; the last chunk samples.
        pending = [(i, r, k, seen) for i, r, k, seen in rows]
        while pending:
            views, room, later = [], self.budget, []
            for i, request, k, seen in pending:
                n = min(len(request.all_token_ids) - seen, room)
                if n <= 0:
                    later.append((i, request, k, seen))
                    continue
                room -= n
                view = DraftView(request.request_id, request.all_token_ids[: seen + n], seen)
                views.append(((i, request, k, seen + n), view, n))
            sampled = self._run([(v, n) for _, v, n in views])
            for ((i, request, k, seen), _, _), token in zip(views, sampled):
                if seen < len(request.all_token_ids):
                    later.append((i, request, k, seen))
                else:
                    drafts[i].append(token)
                    self.seen[request.request_id] = (request.num_preemptions, seen)
            pending = later
        for step in range(1, self.k):
            live = [(i, request) for i, request, k, _ in rows if len(drafts[i]) == step and k > step]
            if not live:
                break
            views = [(DraftView(r.request_id, r.all_token_ids + drafts[i], len(r.all_token_ids) + step - 1), 1)
                     for i, r in live]
            for (i, _), token in zip(live, self._run(views)):
                drafts[i].append(token)
        return drafts

    def _run(self, scheduled: list[tuple[DraftView, int]]) -> list[int]:
        """One draft forward (decodes first, as the scheduler orders them); the argmax of each row's last position."""
        order = sorted(range(len(scheduled)), key=lambda j: scheduled[j][1] != 1)
        handle = self.runner.execute(SchedulerOutput([scheduled[j] for j in order]), self.kv_cache)
        tokens = handle.result().sampled_token_ids
        out = [0] * len(scheduled)
        for j, token in zip(order, tokens):
            out[j] = token
        return out

    def retain(self, request_ids: set[str]) -> None:
        """Forgets the requests no longer running."""
        for request_id in [r for r in self.seen if r not in request_ids]:
            del self.seen[request_id]
