"""`speed.encode_ahead`: the frozen LLM's forward for the next batch, run during this step.

Without cached LLM states, every stage-2 step runs the frozen LLM on its captions before
the adapter and the UNet can start (a 7B forward is ~50 ms of an SDXL step at batch 8,
README "Measured"). Nothing in that forward depends on the step: its inputs are the next
batch's tokens, its weights never change. So the training loader hands each batch the next
batch's tokens too (`NEXT_PROMPTS`, attached in the main process by `with_next_prompts`,
since DataLoader workers take turns and none knows the next batch), and the step starts the
LLM on them while its own UNet forward and backward run:

- on a GPU on a side CUDA stream, which first waits for the main stream (the tokens were
  copied there); the tokens are marked as used by the side stream and the features as used
  by the main one (`record_stream`), and the step that takes them makes the main stream
  wait for the side stream first;
- on a CPU the same calls, synchronously.

Results are the step's own: the same `PromptEncoder.llm_features` on the same tokens (the
LLM is frozen and in eval mode: no random state is drawn), taken only by the batch whose
sample keys they were made for. Anything else (the first step, the first after a resume,
a batch with cached LLM states, validation) encodes in the step as before. The loader's
look-ahead does not move the data stream's saved position: each batch still carries its
own, taken as its step takes it (datamodules/datamodule.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: the batch entry holding the next batch's prompts: {"input_ids", "attention_mask", "key", "lengths"}
NEXT_PROMPTS = "next_prompts"


def with_next_prompts(batches: Iterable[Any]) -> Iterator[Any]:
    """Each batch with the next one's tokens and sample keys (`NEXT_PROMPTS`), read one batch
    ahead. Only where the next batch has tokens and no cached LLM states (those skip the LLM)."""
    iterator = iter(batches)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        if isinstance(current, dict) and isinstance(following, dict) and "student_tokens" in following \
                and "llm_states" not in following:
            tokens = following["student_tokens"]
            current[NEXT_PROMPTS] = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                                     "key": list(following["key"]),
                                     "lengths": tokens["attention_mask"].sum(1).tolist()}
        yield current
        current = following


@dataclass
class _Ahead:
    keys: list[str]
    parts: list[tuple[torch.Tensor, torch.Tensor]]
    groups: list[torch.Tensor]
    stream: Any  # the side CUDA stream it ran on, or None (CPU)


class EncodeAhead:
    """Holds the next batch's LLM features between two steps (one per stage module)."""

    def __init__(self) -> None:
        self.pending: _Ahead | None = None
        self._streams: dict[torch.device, Any] = {}
        self.hits = 0  # batches whose features were ready (what a test and the log can check)

    def take(self, batch: dict) -> tuple[list, list] | None:
        """The features made ahead for this batch, or None (then it encodes in its step)."""
        pending, self.pending = self.pending, None
        if pending is None or pending.keys != list(batch.get("key", ())) or "llm_states" in batch:
            return None
        if pending.stream is not None:  # the side stream's work comes first; its tensors are used here
            current = torch.cuda.current_stream(pending.stream.device)
            current.wait_stream(pending.stream)
            for features, mask in pending.parts:
                features.record_stream(current)
                mask.record_stream(current)
            for index in pending.groups:
                index.record_stream(current)
        self.hits += 1
        return pending.parts, pending.groups

    def launch(self, prompt_encoder, batch: dict, grouped: bool) -> None:
        """Start the LLM on the next batch's tokens carried by `batch` (if any)."""
        following = batch.get(NEXT_PROMPTS)
        if not following:
            return
        ids, mask = following["input_ids"], following["attention_mask"]
        lengths = torch.tensor(following["lengths"])  # on the CPU: the length groups cost no device sync
        if ids.device.type != "cuda":
            parts, groups = prompt_encoder.llm_features(ids, mask, grouped, lengths=lengths)
            self.pending = _Ahead(list(following["key"]), parts, groups, None)
            return
        stream = self._streams.get(ids.device)
        if stream is None:
            stream = self._streams[ids.device] = torch.cuda.Stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))  # the tokens were copied on the main stream
        with torch.cuda.stream(stream):
            ids.record_stream(stream)
            mask.record_stream(stream)
            parts, groups = prompt_encoder.llm_features(ids, mask, grouped, lengths=lengths)
        self.pending = _Ahead(list(following["key"]), parts, groups, stream)
