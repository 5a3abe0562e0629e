"""Logits processors with vLLM v1's batch-level interface (`LogitsProcessor`, `BatchUpdate`): register classes with
`LLM(logits_processors=[Cls])` or `--logits-processors module:Class[,module:Other]`; requests pass their arguments in
`SamplingParams.extra_args`. Built-in ones on the same interface: `allowed_token_ids` and `bad_words`."""

from pagedllm.logits_process.builtin import (
    BUILTIN_LOGITS_PROCESSORS, AllowedTokenIdsLogitsProcessor, BadWordsLogitsProcessor,
)
from pagedllm.logits_process.interface import (
    AddedRequest, BatchUpdate, LogitsProcessor, MovedRequest, MoveDirectionality, RemovedRequest, process_dict_updates,
)
from pagedllm.logits_process.state import (
    LogitsProcessors, diff_rows, resolve_logits_processor, resolve_logits_processors, validate_params,
)

__all__ = [
    "AddedRequest", "AllowedTokenIdsLogitsProcessor", "BUILTIN_LOGITS_PROCESSORS", "BadWordsLogitsProcessor",
    "BatchUpdate", "LogitsProcessor", "LogitsProcessors", "MoveDirectionality", "MovedRequest", "RemovedRequest",
    "diff_rows", "process_dict_updates", "resolve_logits_processor", "resolve_logits_processors", "validate_params",
]
