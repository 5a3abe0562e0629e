"""The engine's side of speculative decoding.

Before each schedule `propose` gives every running request in its decode phase up to k draft tokens (with a grammar:
the leading drafts it allows; each verified row then gets the grammar's mask after the drafts before it)
(`Request.spec_token_ids`); the scheduler runs them with the request's last token as one chunk of 1 + k query tokens,
and the runner samples every one of those positions from the target model, each row with its own history (the
drafts before it), so penalties, min_tokens, seeds and logprobs apply as they would one token at a time. `verify`
keeps the sampled tokens while they equal the drafts, plus the first that does not (or the bonus token after the
last draft): drafts are deterministic guesses, and for such a proposer this is exact rejection sampling (a draft d
is kept with probability p(d); when it is not, the token drawn is p's draw conditioned on not being d), greedy
included (the argmax matches or it does not). The engine then rolls the request's computed tokens back past the
rejected drafts, whose KV slots the next step overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.request import Request
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer


@dataclass
class SpecDecodeStats:
    """vLLM's spec_decode counters: proposals made, draft tokens in them, drafts accepted, and per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @classmethod
    def total(cls, parts: list[SpecDecodeStats]) -> SpecDecodeStats | None:
        """The sum of several engines' counters (data-parallel replicas); None for none."""
        if not parts:
            return None
        per_pos = [sum(p.accepted_per_pos[i] for p in parts) for i in range(len(parts[0].accepted_per_pos))]
        return cls(sum(p.num_drafts for p in parts), sum(p.num_draft_tokens for p in parts),
                   sum(p.num_accepted_tokens for p in parts), per_pos)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verifying step (1 + accepted drafts), vLLM's 'mean acceptance length'."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, proposer: Any = None) -> None:
        self.config, self.max_model_len = config, max_model_len
        k = config.num_speculative_tokens
        self.proposer = proposer or NgramProposer(k, config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * k)

    def budget(self, request: Request) -> int:
        """How many drafts the request can use now: 0 unless it is decoding (one known token to compute, none in
        flight), with its grammar (if any) matching, not still compiling or waiting out a reasoning part; never past
        max_tokens (the step samples one more) or the context length."""
        grammar = request.structured_output
        if (request.num_pending or (grammar is not None and (not grammar.active or grammar.terminated))
                or request.num_computed_tokens != len(request.all_token_ids) - 1):
            return 0
        left = min(request.max_tokens - len(request.output_token_ids) - 1, self.max_model_len - len(request.all_token_ids))
        return max(0, min(self.config.num_speculative_tokens, left))

    def propose(self, running: list[Request]) -> None:
        batch = [(r, k) for r in running if (k := self.budget(r)) > 0]
        for request in running:
            request.spec_token_ids = []
        # Called even with nothing to draft: EAGLE's head follows every step of every running request.
        for request, drafts in zip((r for r, _ in batch), self.proposer.propose_batch(batch, running)):
            grammar = request.structured_output
            request.spec_token_ids = drafts if grammar is None else grammar.grammar_prefix(drafts)
        self.proposer.retain({r.request_id for r in running})

    def verify(self, drafts: list[int], sampled: list[int]) -> list[int]:
        """The tokens a verifying step emits: its samples up to and including the first that is not the draft at
        its position (all of them, the bonus token too, when every draft holds)."""
        assert len(sampled) == len(drafts) + 1
        accepted = 0
        while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
            self.stats.accepted_per_pos[accepted] += 1
            accepted += 1
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += len(drafts)
        self.stats.num_accepted_tokens += accepted
        return sampled[: accepted + 1]


def make_spec_decoder(config: Any, target_runner: Any, kv_cache: Any) -> SpecDecoder:
    """The engine's decoder for its EngineConfig (speculative_config parsed), target model runner and KV cache."""
    spec: SpeculativeConfig = config.speculative_config
    assert config.max_model_len is not None
    if spec.method == "draft_model":
        from pagedllm.spec_decode.draft_model import DraftModelProposer

        return SpecDecoder(spec, config.max_model_len, DraftModelProposer(config, target_runner, kv_cache))
    if spec.method in ("eagle", "eagle3"):
        from pagedllm.spec_decode.eagle import EagleProposer

        return SpecDecoder(spec, config.max_model_len, EagleProposer(config, target_runner, kv_cache))
    return SpecDecoder(spec, config.max_model_len)
