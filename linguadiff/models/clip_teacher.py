"""The CLIP teacher of stage 1: the text features the base model's UNet consumes.

Stage 1 (OmniDiffusion, ECCV 2024) trains the adapter to reproduce the base model's own
CLIP text features on text alone. The teacher loads the text side of a diffusers base
folder (``tokenizer/``, ``text_encoder/``, and for SDXL ``tokenizer_2/``,
``text_encoder_2/``) with ``from_pretrained`` and gives:

- ``sd15``: CLIP-L's last hidden state (after the final layer norm) of the prompt padded
  to the tokenizer's 77 tokens, as the SD1.5 pipelines feed the UNet -> ``[B, 77, 768]``.
- ``sdxl``: the paper's long-prompt form (DESIGN.md: N = 227 = 3 x 75 + 2). The prompt's
  tokens (without BOS/EOS) are cut into 3 windows of 75; each window is encoded by both
  CLIP-L and OpenCLIP-bigG as a normal 77-token SDXL prompt, and the penultimate hidden
  layers (``hidden_states[-2]``, as SDXL uses them) are concatenated -> 768 + 1280 = 2048
  per token. The windows are joined into 1 + 3 x 75 + 1 = 227 tokens: the first window's
  BOS slot, slots 1..75 of every window, and the last window's final slot (its EOS when
  the prompt fills it). Pooled: bigG's projected pooled output (``text_embeds``) of the
  first window -> ``[B, 1280]``.

Window layout: each window is ``BOS + tokens + EOS`` padded to 77 with that tokenizer's pad
(CLIP-L pads with EOS, bigG with ``"!"``), exactly what the SDXL pipeline builds for a
prompt of up to 75 tokens. So for such prompts window 1 and the pooled vector equal the
base model's usual conditioning, and the pooled vector is taken at the EOS right after
the text, where bigG was trained to pool (an EOS forced to slot 76 after 70 ``"!"`` pads
would give a pooled vector the UNet never saw). Windows are encoded in one batched call.

Dimensions are read from the loaded configs (tiny stand-ins have other sizes). The SD
pipelines pass no attention mask to CLIP (causal attention only), and neither does this.

`windows=1` (SDXL) is exactly the SDXL pipeline's own conditioning: one window of 77 tokens
(the prompt cut at 75), both encoders' penultimate layers joined, bigG's pooled projection.
A control run (`text_encoder=clip`) trains and draws with that form, so its UNet is used in a
plain diffusers pipeline just as it was trained. As the conditioning of a run, the module
also reads a training batch (`condition`) like the LLM's PromptEncoder does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from linguadiff.models.frozen import freeze
from linguadiff.models.losses import ContextPart
from linguadiff.models.text_encoder import torch_dtype

TeacherKind = Literal["sd15", "sdxl"]

# The paper's SDXL target covers 3 windows of 75 prompt tokens (N = 3 x 75 + 2 = 227).
SDXL_WINDOWS = 3


class CLIPPromptTokenizer:
    """Tokenize prompts for :class:`CLIPTeacher`; picklable and model-free (DataLoader workers).

    ``__call__(texts)`` returns
    - sd15: ``{"input_ids": LongTensor[B, 77]}``,
    - sdxl: ``{"input_ids": LongTensor[B, 3, 77], "input_ids_2": LongTensor[B, 3, 77]}``
      (windows for CLIP-L and for bigG, each tokenized by its own tokenizer).
    """

    def __init__(self, base_path: str | Path, kind: TeacherKind, windows: int = SDXL_WINDOWS,
                 revision: str | None = None) -> None:
        if kind not in ("sd15", "sdxl"):
            raise ValueError(f"teacher kind must be 'sd15' or 'sdxl', got {kind!r}")
        if not 1 <= windows <= SDXL_WINDOWS:
            raise ValueError(f"windows must be 1 to {SDXL_WINDOWS}, got {windows!r}")
        self.kind: TeacherKind = kind
        self.windows = windows  # sdxl: 75-token windows (1: the SDXL pipeline's own form)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(base_path), subfolder="tokenizer", revision=revision)
        self.tokenizer_2 = (
            CLIPTokenizer.from_pretrained(str(base_path), subfolder="tokenizer_2", revision=revision)
            if kind == "sdxl" else None
        )
        self.max_length = int(self.tokenizer.model_max_length)  # 77 for every SD base
        self.window = self.max_length - 2  # prompt tokens per window, between BOS and EOS

    @property
    def context_tokens(self) -> int:
        """Tokens in the teacher's context: 77 (sd15) or 3 x 75 + 2 = 227 (sdxl)."""
        return self.max_length if self.kind == "sd15" else self.windows * self.window + 2

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("CLIPPromptTokenizer takes a list of prompts, not a single string")
        texts = list(texts)
        if self.kind == "sd15":
            ids = self.tokenizer(
                texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )["input_ids"]
            return {"input_ids": ids}
        return {"input_ids": self._windows(self.tokenizer, texts), "input_ids_2": self._windows(self.tokenizer_2, texts)}

    @property
    def prompt_token_limit(self) -> int:
        """Prompt tokens the teacher reads (BOS/EOS aside): 75 (sd15) or 3 x 75 = 225 (sdxl)."""
        return self.window if self.kind == "sd15" else self.windows * self.window

    @property
    def bos_id(self) -> int:
        """The id every prompt starts with (what an export stamps as its BOS)."""
        return int(self.tokenizer.bos_token_id)

    def visible_text(self, texts: list[str]) -> list[str]:
        """Each text cut where the teacher stops reading it (whole when it fits).

        The cut falls at the end of the last whitespace-separated word whose tokens all fit:
        CLIP's BPE never merges across whitespace, so the cut text's tokens are exactly the
        first tokens the teacher read (a word split by the teacher's limit is left out). A
        text whose first word is already too long is cut by characters. Both SDXL
        tokenizers share CLIP's vocabulary, so the first one counts for both.
        """
        limit = self.prompt_token_limit
        texts = list(texts)
        counts = self._count(texts)
        return [text if n <= limit else self._cut(text, limit) for text, n in zip(texts, counts)]

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def _cut(self, text: str, limit: int) -> str:
        ends = [m.end() for m in re.finditer(r"\S+", text)]
        fits = _last_fitting(ends, lambda end: self._count([text[:end]])[0] <= limit)
        if fits is not None:
            return text[:fits]
        first = ends[0] if ends else len(text)
        fits = _last_fitting(list(range(1, first + 1)), lambda end: self._count([text[:end]])[0] <= limit)
        return text[:fits] if fits is not None else ""

    def _windows(self, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
        """``[B, windows, 77]``: per window ``BOS + up to 75 tokens + EOS``, then that tokenizer's pad."""
        content = tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.windows * self.window
        )["input_ids"]
        out = torch.full((len(texts), self.windows, self.max_length), tokenizer.pad_token_id, dtype=torch.long)
        for b, row in enumerate(content):
            for w in range(self.windows):
                chunk = row[w * self.window : (w + 1) * self.window]
                window = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
                out[b, w, : len(window)] = torch.tensor(window, dtype=torch.long)
        return out


def _last_fitting(candidates: list[int], fits) -> int | None:
    """The last of the increasing `candidates` for which the monotone `fits` holds (binary search)."""
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        mid = (low + high) // 2
        if fits(candidates[mid]):
            best, low = candidates[mid], mid + 1
        else:
            high = mid - 1
    return best


def llm_text_for_teacher(llm_text: str, teacher_text: str, teacher_visible: str) -> str:
    """What stage 1 feeds the LLM so that it reads what the teacher read.

    The teacher sees at most 75 (SD1.5) or 225 (SDXL) prompt tokens; an LLM reading the
    whole caption would be taught that whatever follows the teacher's limit means nothing.
    Same text on both sides: the LLM gets exactly the part the teacher saw. A parallel
    pair (English to the teacher, another language to the LLM) has no token alignment, so
    the other text is cut at the same fraction of its characters as the English was (at
    the preceding whitespace, when it has any): translations keep the order of content
    roughly, not exactly. Texts the teacher read whole are left as they are.
    """
    if teacher_visible == teacher_text:
        return llm_text
    if llm_text == teacher_text:
        return teacher_visible
    cut = round(len(llm_text) * len(teacher_visible) / max(len(teacher_text), 1))
    space = llm_text.rfind(" ", 0, cut + 1)
    return llm_text[: space if space > 0 else cut].rstrip()


class TeacherBoundedTokenizer:
    """Stage 1's LLM tokenizer: a `PromptTokenizer` fed only what the teacher read of each
    pair (`llm_text_for_teacher`); picklable and model-free like both tokenizers it holds.

    ``__call__(texts, teacher_texts)``; without ``teacher_texts`` (inference-like use) the
    texts go to the LLM whole, up to its own ``max_length``.
    """

    def __init__(self, student, teacher: CLIPPromptTokenizer) -> None:
        self.student = student
        self.teacher = teacher

    def bounded(self, texts: list[str], teacher_texts: list[str]) -> list[str]:
        texts, teacher_texts = list(texts), list(teacher_texts)
        if len(texts) != len(teacher_texts):
            raise ValueError(f"{len(texts)} LLM texts for {len(teacher_texts)} teacher texts")
        visible = self.teacher.visible_text(teacher_texts)
        return [llm_text_for_teacher(t, e, v) for t, e, v in zip(texts, teacher_texts, visible)]

    def __call__(self, texts: list[str], teacher_texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        return self.student(texts if teacher_texts is None else self.bounded(texts, teacher_texts))


def _encode_unique_windows(encoder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penultimate hidden states (and projected pooled output, when the model has one) of
    each window, encoding every distinct window once.

    Most prompts fill one window of three: the other two are BOS + EOS + padding, the same
    for every prompt, and CLIP (causal, no attention mask) gives them the same features. So
    encoding the distinct rows and indexing back gives identical results for less work.
    """
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    # Per-call output_hidden_states (DESIGN.md: configs lose it when unpickled).
    out = encoder(input_ids=unique, output_hidden_states=True)
    # hidden_states = (embeddings, layer 1, ..., layer L): [-2] is the penultimate layer.
    hidden = out.hidden_states[-2][inverse]
    pooled = out.text_embeds[inverse] if getattr(out, "text_embeds", None) is not None else None
    return hidden, pooled


class CLIPTeacher(nn.Module):
    """The base model's frozen CLIP text encoder(s).

    ``forward(tokens) -> {"context": [B, N, D] float32, "pooled": [B, P] float32 or None}``
    with ``tokens`` from :attr:`tokenizer`; N = :attr:`context_tokens`, D = :attr:`context_dim`,
    P = :attr:`pooled_dim` (None for sd15).
    """

    def __init__(self, base_path: str | Path, kind: TeacherKind, dtype: str | torch.dtype = "float32",
                 windows: int = SDXL_WINDOWS, revision: str | None = None) -> None:
        """`windows` (sdxl): 3 for stage 1's long-prompt target (227 tokens), 1 for the SDXL
        pipeline's own conditioning (77 tokens). `revision`: the base's (config `model.revision`),
        as for its UNet, VAE and scheduler."""
        super().__init__()
        self._tokenizer = CLIPPromptTokenizer(base_path, kind, windows, revision)
        self.kind: TeacherKind = kind
        dtype = torch_dtype(dtype)
        self.text_encoder = freeze(CLIPTextModel.from_pretrained(str(base_path), subfolder="text_encoder", dtype=dtype,
                                                                 revision=revision))
        self.text_encoder_2 = (
            freeze(CLIPTextModelWithProjection.from_pretrained(str(base_path), subfolder="text_encoder_2", dtype=dtype,
                                                              revision=revision))
            if kind == "sdxl"
            else None
        )
        positions = self.text_encoder.config.max_position_embeddings
        if self._tokenizer.max_length > positions:
            raise ValueError(f"tokenizer max_length {self._tokenizer.max_length} exceeds CLIP's {positions} positions")
        freeze(self)  # the wrapper too, so nothing added to it later can train by accident

    @property
    def tokenizer(self) -> CLIPPromptTokenizer:
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._tokenizer.context_tokens

    @property
    def context_dim(self) -> int:
        width = self.text_encoder.config.hidden_size
        return width + self.text_encoder_2.config.hidden_size if self.text_encoder_2 is not None else width

    @property
    def context_parts(self) -> tuple[ContextPart, ...]:
        """Which encoder each slice of the context's width comes from (SDXL: CLIP-L, then bigG)."""
        first = ContextPart("clip_l", self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is None:
            return (first,)
        return first, ContextPart("clip_g", self.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int | None:
        return self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else None

    def forward(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        device = self.text_encoder.device
        with torch.no_grad():
            if self.text_encoder_2 is None:
                context = self.text_encoder(input_ids=tokens["input_ids"].to(device)).last_hidden_state
                return {"context": context.float(), "pooled": None}

            ids, ids_2 = tokens["input_ids"].to(device), tokens["input_ids_2"].to(device)
            batch, windows, length = ids.shape
            hidden_1, _ = _encode_unique_windows(self.text_encoder, ids.reshape(-1, length))
            hidden_2, pooled_2 = _encode_unique_windows(self.text_encoder_2, ids_2.reshape(-1, length))
            per_window = torch.cat([hidden_1.float(), hidden_2.float()], dim=-1).reshape(batch, windows, length, -1)
            context = torch.cat(
                [
                    per_window[:, 0, :1],  # the first window's BOS slot
                    per_window[:, :, 1 : length - 1].reshape(batch, windows * (length - 2), -1),
                    per_window[:, -1, length - 1 :],  # the last window's final (EOS) slot
                ],
                dim=1,
            )
            pooled = pooled_2.reshape(batch, windows, -1)[:, 0].float()
        return {"context": context, "pooled": pooled}

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor | None]:
        """Tokenize and encode: ``{"context", "pooled"}``."""
        return self(self.tokenizer(texts))

    def condition(self, batch, device: torch.device | None = None, grouped: bool = True,
                  text_field: str = "caption") -> dict[str, torch.Tensor | None]:
        """A training batch's conditioning, as `PromptEncoder.condition` gives it: from the tokens
        the data workers made with :attr:`tokenizer` (``student_tokens``), else from tokenizing
        ``batch[text_field]`` here. A dropped caption is the empty prompt, encoded as the
        pipelines encode their unconditional input. Cached LLM states are not read.
        `device` and `grouped` are the PromptEncoder's (the encoder sits on its own device;
        CLIP's fixed 77 tokens need no length groups)."""
        tokens = batch.get("student_tokens") or self.tokenizer(list(batch[text_field]))
        return self(tokens)


def teacher_kind(base_kind: str) -> str:
    """The teacher a base kind needs: the demo base is SD1.5-shaped (its UNet reads CLIP's last hidden state)."""
    return "sd15" if base_kind == "demo" else base_kind
