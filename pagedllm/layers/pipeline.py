"""Which layers a pipeline stage holds: a contiguous range of decoder layers, the embedding on the
first stage, the final norm and LM head on the last. Modules of other stages are `MissingLayer`
placeholders, so parameter names keep their global layer indices and match the checkpoint."""

from __future__ import annotations

from torch import nn

from pagedllm.distributed.parallel_state import get_parallel_state


class MissingLayer(nn.Module):
    """A module that lives on another pipeline stage (it holds no weights; the loader skips its names)."""


def stage_layers(num_layers: int) -> range:
    """This stage's decoder layers: an even split, earlier stages taking one fewer when it does not divide."""
    state = get_parallel_state()
    if num_layers < state.pp_size:
        raise ValueError(f"pipeline_parallel_size={state.pp_size} is larger than the model's {num_layers} layers.")
    return range(state.pp_rank * num_layers // state.pp_size, (state.pp_rank + 1) * num_layers // state.pp_size)


def is_missing(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` belongs to a module held by another stage."""
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return False
        if isinstance(module, MissingLayer):
            return True
    return False
