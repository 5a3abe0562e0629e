"""EAGLE proposals: a one-layer head (models/eagle.py) reads the target's hidden states and drafts greedily.

The head has a KV cache of its own, in a pool of the target's block count indexed by the target's block tables (as
the draft model's), where its position p holds what it computed from (token p + 1, the target's feature at p).
Before each schedule, for every running request the last target step computed, it first catches up: its positions
from where its KV stops being valid to the request's last computed one, fed the tokens one further on (the last is
the token just sampled) and the target's hidden states of that step (the runner keeps them: `keep_hidden`). The
last of those positions gives a request's first draft; each further draft feeds the previous one and the head's own
output feature. Rejected drafts leave head KV at positions the next catch-up overwrites.

A request starting past prefix-cache hits trusts the head KV of its cached blocks (written when they were computed);
after a preemption the head starts over with the target. Stale or missing head KV can only lower acceptance: the
target verifies every draft (spec_decode/decoder.py). One rank only: tensor and pipeline parallelism are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.engine.request import Request
from pagedllm.models.loader import checkpoint_names
from pagedllm.spec_decode.draft_model import DraftView


def enable_aux_hidden(model: Any, max_tokens: int, device: Any) -> None:
    """EAGLE-3's target: its forward also keeps the residual stream entering layers 2, L // 2 and L - 3 (vLLM's
    choice for Llama-family targets), in ascending order, in a buffer of `max_tokens` rows that outlives each step."""
    inner = model.model
    num_layers = len(inner.layers)
    inner.aux_layers = tuple(sorted((2, num_layers // 2, num_layers - 3)))
    if min(inner.aux_layers) < 0 or max(inner.aux_layers) >= num_layers:
        raise ValueError(f"speculative_config: EAGLE-3 reads layers {inner.aux_layers} of a {num_layers}-layer target.")
    width = len(inner.aux_layers) * inner.embed_tokens.weight.shape[1]
    inner.aux_buffer = torch.zeros(max_tokens, width, dtype=inner.embed_tokens.weight.dtype, device=device)


class EagleProposer:
    def __init__(self, config: Any, target_runner: Any, kv_cache: Any) -> None:
        from pagedllm.worker.model_runner import ModelRunner

        if config.world_size > 1:
            raise ValueError("speculative_config: method 'eagle' runs on one rank; tensor and pipeline parallelism "
                             "are not supported with it yet (use 'ngram' or 'draft_model').")
        spec = config.speculative_config
        head = dataclasses.replace(
            config, model=spec.model, tokenizer=None, quantization=None, speculative_config=None, enforce_eager=True,
            num_gpu_blocks_override=target_runner.num_blocks, hf_config=None, model_path=None,
            skip_tokenizer_init=True, async_scheduling=False, logits_processors=None)
        head.finalize()
        keys = checkpoint_names(head.model_path)
        eagle3 = spec.method == "eagle3"
        marker = "midlayer.self_attn.q_proj.weight" if eagle3 else "layers.0.self_attn.q_proj.weight"
        if "fc.weight" not in keys or marker not in keys:
            raise ValueError(f"speculative_config: {spec.model} is not an {'EAGLE-3' if eagle3 else 'EAGLE'} head "
                             f"(no fc.weight and {marker} in its safetensors).")
        hf = head.hf_config
        if hf.hidden_size != target_runner.hidden_size:
            raise ValueError(f"speculative_config: the EAGLE head's hidden size ({hf.hidden_size}) is not the "
                             f"target's ({target_runner.hidden_size}).")
        hf.architectures = ["Eagle3LlamaForCausalLM" if eagle3 else "EagleLlamaForCausalLM"]
        hf.eagle_fc_bias, hf.eagle_own_embedding = "fc.bias" in keys, "embed_tokens.weight" in keys
        self.runner = ModelRunner(head)
        model = self.runner.model
        target = target_runner.model
        if not hf.eagle_own_embedding:
            model.embed_tokens = target.model.embed_tokens
        if not eagle3:  # EAGLE-1 reads the target's LM head; EAGLE-3 has its own over a draft vocabulary
            model.lm_head = target.lm_head
        target_runner.keep_hidden = True
        self.model, self.target, self.kv_cache = model, target_runner, kv_cache
        self.k = spec.num_speculative_tokens
        self.valid: dict[str, tuple[int, int]] = {}  # request -> (its preemptions, head positions whose KV is valid)

    @torch.inference_mode()
    def propose_batch(self, batch: list[tuple[Request, int]], running: list[Request]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in batch]
        step = self.target.last_step
        self.target.last_step = None
        if step is None:
            return drafts
        hidden, layout = step
        where = {request_id: (start, flat) for request_id, start, flat, _ in layout}
        slot = {request.request_id: i for i, (request, _) in enumerate(batch)}
        rows: list[tuple[Request, DraftView, int, torch.Tensor]] = []
        for request in running:
            if request.request_id not in where:
                continue
            start, flat = where[request.request_id]
            preemptions, valid = self.valid.get(request.request_id, (request.num_preemptions, start))
            low = max(valid if preemptions == request.num_preemptions else start, start)
            high = min(request.num_computed_tokens, len(request.all_token_ids) - 1)  # the next token is known
            if high > low:
                shifted = request.all_token_ids[1 : high + 1]  # position p holds token p + 1
                rows.append((request, DraftView(request.request_id, shifted, low), high - low,
                             hidden[flat + low - start : flat + high - start]))
                self.valid[request.request_id] = (request.num_preemptions, high)
        if not rows:
            return drafts
        features = self._run([(view, n, h) for _, view, n, h in rows])
        # Drafting requests whose catch-up ended at their last computed position: the first draft, then k - 1 more.
        live: list[tuple[int, Request, int, torch.Tensor]] = []
        tokens = self._tokens(features)
        for (request, view, n, _), token, feature in zip(rows, tokens, features):
            i = slot.get(request.request_id)
            if i is None or view.num_computed_tokens + n != request.num_computed_tokens:
                continue
            k = batch[i][1]
            if not self.kv_cache.allocate_slots(request.request_id, len(request.all_token_ids) + k - 1):
                continue
            drafts[i].append(token)
            live.append((i, request, k, feature))
        for step_index in range(1, self.k):
            live = [entry for entry in live if entry[2] > step_index]
            if not live:
                break
            views = [(DraftView(r.request_id, r.all_token_ids[1:] + drafts[i], r.num_computed_tokens + step_index - 1),
                      1, feature[None]) for i, r, _, feature in live]
            features = self._run(views)
            for (i, _, _, _), token in zip(live, self._tokens(features)):
                drafts[i].append(token)
            live = [(i, r, k, feature) for (i, r, k, _), feature in zip(live, features)]
        return drafts

    def _run(self, rows: list[tuple[DraftView, int, torch.Tensor]]) -> torch.Tensor:
        """One head forward; the output feature of each row's last position, in the order given."""
        order = sorted(range(len(rows)), key=lambda j: rows[j][1] != 1)  # decodes first, as the scheduler orders
        self.model.hidden_in = torch.cat([rows[j][2] for j in order])
        try:
            out = self.runner.forward_rows(SchedulerOutput([(rows[j][0], rows[j][1]) for j in order]), self.kv_cache)
        finally:
            self.model.hidden_in = None
        back = torch.empty_like(out)
        back[torch.tensor(order, device=out.device)] = out
        return back

    def _tokens(self, features: torch.Tensor) -> list[int]:
        return self.model.draft_tokens(features).tolist()

    def retain(self, request_ids: set[str]) -> None:
        for request_id in [r for r in self.valid if r not in request_ids]:
            del self.valid[request_id]
