"""Beam search exactly as transformers' `generate(num_beams=w, do_sample=False, length_penalty=lp)` runs it
(early_stopping=False), over beams whose next-token logprobs come from the engine.

Each step ranks the continuations of every running beam by cumulative logprob and keeps the top
k = max(2, 1 + #EOS) * w (a beam's own top k suffices: no more than k of the flat top k come from one beam).
Among them, EOS continuations in the first w finish, scored cum_logprob / num_tokens ** lp (EOS counted);
the best w others run on. At max_tokens the first w all finish. The search ends once w hypotheses have
finished and the best running beam, scored at its current length, cannot beat the worst of them.

The drivers (`LLM.beam_search`, `AsyncLLM.beam_search`) only run each step's beams as engine requests.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from pagedllm.outputs import LogprobsDict
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import LLMEngine, PromptType


@dataclass
class BeamSearchSequence:
    """A beam or a finished hypothesis."""

    tokens: list[int]  # the prompt's, then the generated ones
    logprobs: list[LogprobsDict] = field(default_factory=list)  # one entry per generated token
    cum_logprob: float = 0.0
    text: str | None = None  # the generated text, filled in for the returned sequences
    finish_reason: str | None = None  # "stop" (EOS) | "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the beam_width best hypotheses, best first


def num_candidates(beam_width: int, num_eos: int) -> int:
    """Continuations kept per step: enough that w survive even if the top ones all end in EOS."""
    return max(2, 1 + num_eos) * beam_width


def get_beam_search_score(seq: BeamSearchSequence, length_penalty: float) -> float:
    return seq.cum_logprob / len(seq.logprobs) ** length_penalty


def beam_search_step(
    beams: list[BeamSearchSequence], next_logprobs: list[LogprobsDict], beam_width: int, max_tokens: int,
    eos_token_ids: set[int],
) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """One prompt's step: beam i continues with the tokens of `next_logprobs[i]` (its top-k at least).
    Returns the next running beams (best first) and the hypotheses that finished."""
    scored = ((beam.cum_logprob + lp.logprob, i, token) for i, beam in enumerate(beams) for token, lp in next_logprobs[i].items())
    candidates = heapq.nlargest(num_candidates(beam_width, len(eos_token_ids)), scored, key=lambda c: c[0])
    at_max_length = len(beams[0].logprobs) + 1 >= max_tokens
    running: list[BeamSearchSequence] = []
    finished: list[BeamSearchSequence] = []
    for rank, (cum_logprob, i, token) in enumerate(candidates):
        child = BeamSearchSequence(beams[i].tokens + [token], beams[i].logprobs + [next_logprobs[i]], cum_logprob)
        is_eos = token in eos_token_ids
        if is_eos or at_max_length:
            if rank < beam_width:  # the candidates past the first w are only spares for the running set
                child.finish_reason = "stop" if is_eos else "length"
                finished.append(child)
        elif len(running) < beam_width:
            running.append(child)
    return running, finished


def is_done(running: list[BeamSearchSequence], completed: list[BeamSearchSequence], beam_width: int, length_penalty: float) -> bool:
    """`completed` holds the best finished hypotheses, best first."""
    if not running:
        return True
    if len(completed) < beam_width:
        return False
    # At width 1 this stops at the first EOS (the running beam is as long and less likely): greedy search,
    # which is what transformers runs for num_beams=1.
    return get_beam_search_score(running[0], length_penalty) <= get_beam_search_score(completed[-1], length_penalty)


@dataclass
class BeamSearchInstance:
    """One prompt's search."""

    beams: list[BeamSearchSequence]  # running, best first
    cache_salt: str | None = None  # the prompt's, given to each of its beams' requests
    completed: list[BeamSearchSequence] = field(default_factory=list)  # finished, best first, at most beam_width
    done: bool = False


class BeamSearch:
    """The searches of several prompts, stepped together: each step, every running beam of every prompt is
    one engine request (`step_prompts`, run with `step_params`), and `advance` takes their logprobs in order."""

    def __init__(self, instances: list[BeamSearchInstance], params: BeamSearchParams, eos_token_ids: set[int]) -> None:
        self.instances = instances
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.num_candidates = num_candidates(params.beam_width, len(self.eos_token_ids))
        self.num_steps = 0

    @classmethod
    def for_engine(cls, engine: LLMEngine, prompts: Sequence[PromptType], params: BeamSearchParams) -> BeamSearch:
        """Tokenizes the prompts as the engine does; raises ValueError (naming the field) if the search could not run."""
        instances = [
            BeamSearchInstance([BeamSearchSequence(engine.tokenize_prompt(p)[1])], p.get("cache_salt") if isinstance(p, dict) else None)
            for p in prompts
        ]
        search = cls(instances, params, engine.eos_token_ids)
        max_len = engine.config.max_model_len
        assert max_len is not None
        longest = max((len(instance.beams[0].tokens) for instance in instances), default=0)
        if longest + params.max_tokens > max_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} is too large: the longest prompt has {longest} tokens and the "
                f"context (max_model_len) holds {max_len}."
            )
        if search.num_candidates > engine.vocab_size:
            raise ValueError(f"beam_width={params.beam_width} is too large for a vocabulary of {engine.vocab_size} tokens.")
        return search

    @property
    def done(self) -> bool:
        return all(instance.done for instance in self.instances)

    @property
    def step_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.num_candidates, ignore_eos=True)

    def _running(self) -> list[BeamSearchInstance]:
        return [instance for instance in self.instances if not instance.done]

    def step_prompts(self) -> list[dict[str, Any]]:
        prompts = []
        for instance in self._running():
            salt = {} if instance.cache_salt is None else {"cache_salt": instance.cache_salt}
            prompts += [{"prompt_token_ids": beam.tokens, **salt} for beam in instance.beams]
        return prompts

    def advance(self, next_logprobs: list[LogprobsDict]) -> None:
        """Applies a step: `next_logprobs` has one entry per prompt of `step_prompts`, in order."""
        p = self.params
        entries = iter(next_logprobs)
        for instance in self._running():
            logprobs = [next(entries) for _ in instance.beams]
            instance.beams, finished = beam_search_step(instance.beams, logprobs, p.beam_width, p.max_tokens, self.eos_token_ids)
            # A stable sort: on a tie, the earlier hypothesis stays ahead, as in transformers.
            ranked = sorted(instance.completed + finished, key=lambda s: get_beam_search_score(s, p.length_penalty), reverse=True)
            instance.completed = ranked[: p.beam_width]
            instance.done = is_done(instance.beams, instance.completed, p.beam_width, p.length_penalty)
        self.num_steps += 1

    def outputs(self, tokenizer: Any) -> list[BeamSearchOutput]:
        """Each prompt's hypotheses, best first, with their text when there is a tokenizer."""
        for instance in self.instances:
            for seq in instance.completed:
                generated = seq.tokens[len(seq.tokens) - len(seq.logprobs) :]
                if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                    generated = generated[:-1]
                seq.text = None if tokenizer is None else tokenizer.decode(generated, skip_special_tokens=True)
        return [BeamSearchOutput(instance.completed) for instance in self.instances]
