"""Stage 1: text-only alignment of LLM + adapter (student) to the base's CLIP features (teacher).

Paper, stage 1: the frozen LLM reads the prompt, the adapter maps its tokens to N context
tokens, and the loss pulls them onto what the base model's own CLIP text encoder gives for
the English side of the pair. English pairs feed both sides the same text; parallel pairs
feed the other language to the LLM only, so one mapping serves every language. Only the
adapter trains.

Beyond the paper: the empty prompt is aligned as well (``loss.empty_prompt_weight``), since
classifier-free guidance feeds it to the frozen base as the unconditional input; validation
reports per-language retrieval recall (does a caption's student output find its English
teacher output among the held-out pool?).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from lightning_modules.base import StageModule
from lightning_modules.settings import AlignmentSettings, StageSettings
from linguadiff.config import ConfigError
from linguadiff.distributed import gather_objects
from linguadiff.models.clip_teacher import CLIPTeacher, TeacherBoundedTokenizer, teacher_kind
from linguadiff.models.losses import retrieval_recall
from linguadiff.models.prompt_encoder import PromptEncoder
from linguadiff.models.text_encoder import LLMTextEncoder
from linguadiff.strategy import llm_device

log = logging.getLogger(__name__)


class Stage1Alignment(StageModule):
    def __init__(self, settings: StageSettings, alignment: AlignmentSettings, prompt_encoder: PromptEncoder,
                 teacher: CLIPTeacher) -> None:
        super().__init__(settings)
        check_fit(prompt_encoder, teacher)
        self.alignment_settings = alignment
        self.text_encoder = prompt_encoder.text_encoder
        self.adapter = prompt_encoder.adapter
        self.teacher = teacher
        self.apply_trainable()
        self.apply_speed_options()
        self._val_outputs: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Stage1Alignment":
        """Load the LLM and the base's CLIP teacher (from_pretrained) and build a fresh adapter."""
        text_encoder = LLMTextEncoder.from_settings(cfg.llm, device=llm_device(cfg))
        teacher = CLIPTeacher(cfg.model.path, kind=teacher_kind(cfg.model.kind), dtype=cfg.model.dtype,
                              revision=cfg.model.revision)
        prompt_encoder = PromptEncoder.with_new_adapter(text_encoder, cfg.adapter)
        try:
            check_fit(prompt_encoder, teacher, llm_name=cfg.llm.name, base_name=cfg.model.name)
        except AdapterMismatch as err:
            raise ConfigError(f"the adapter does not fit the base model: {err}") from None
        return cls(StageSettings.from_config(cfg), AlignmentSettings.from_config(cfg, teacher.context_parts), prompt_encoder,
                   teacher)

    def tokenizers(self) -> dict[str, Any]:
        """Picklable tokenizers the data workers run (no model inside)."""
        # The LLM reads only what the teacher read of each caption (README: long prompts).
        return {"teacher": self.teacher.tokenizer,
                "student": TeacherBoundedTokenizer(self.text_encoder.tokenizer, self.teacher.tokenizer)}

    # ------------------------------------------------------------------ forward

    def student(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """LLM + adapter, run per group of similar prompt lengths (same result, less padding)."""
        return self.prompt_encoder(tokens["input_ids"], tokens["attention_mask"], grouped=not self.sharded)

    def alignment(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        return self.alignment_settings.loss(student, teacher)

    def empty_prompt(self) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
        """The empty prompt's LLM features and CLIP target: they never change, computed once.

        Computed inside the first step, through the modules themselves (not their .encode):
        under FSDP only a unit's own forward gathers its weights, and the first forward must
        enter through the root module.
        """
        if getattr(self, "_empty_cache", None) is None:
            student = {k: v.to(self.device) for k, v in self.text_encoder.tokenizer([""]).items()}
            teacher = {k: v.to(self.device) for k, v in self.teacher.tokenizer([""]).items()}
            with torch.no_grad():
                self._empty_cache = (self.text_encoder(student["input_ids"], student["attention_mask"]), self.teacher(teacher))
        return self._empty_cache

    # ------------------------------------------------------------------ steps

    def _tokens(self, batch: dict, side: str) -> dict[str, torch.Tensor]:
        tokens = batch.get(f"{side}_tokens")
        if tokens is None:  # no tokenizers in the workers (e.g. a plain list of texts)
            texts = [batch["student_text"], batch["teacher_text"]] if side == "student" else [batch["teacher_text"]]
            tokens = self.tokenizers()[side](*texts)
        return {k: v.to(self.device) for k, v in tokens.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        size = self.batch_size_of(batch)
        teacher = self.teacher(self._tokens(batch, "teacher"))
        out = self.alignment(self.student(self._tokens(batch, "student")), teacher)
        loss = out["loss"]
        weight = self.alignment_settings.empty_prompt_weight
        if weight > 0:
            features, target = self.empty_prompt()
            empty = self.alignment(self.prompt_encoder.from_features(*features), target)
            loss = loss + weight * empty["loss"]
            self.log("train/empty_prompt_cosine", empty["cosine"], batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/cosine", out["cosine"], prog_bar=True, batch_size=size)
        self.log("train/norm_mse", out["norm_mse"], batch_size=size)
        if "pooled_cosine" in out:
            self.log("train/pooled_cosine", out["pooled_cosine"], batch_size=size)
        for part, cosine in out.get("part_cosines", {}).items():  # SDXL: is each encoder's half fitted?
            self.log(f"train/cosine_{part}", cosine, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.count_val_skipped(batch)
        size = self.batch_size_of(batch)
        teacher = self.teacher(self._tokens(batch, "teacher"))
        student = self.student(self._tokens(batch, "student"))
        out = self.alignment(student, teacher)
        if batch.get("padding"):  # an FSDP rank's filler batch: run, not counted
            return
        metrics = {"val/loss": out["loss"], "val/cosine": out["cosine"]}
        metrics.update({f"val/cosine_{part}": cosine for part, cosine in out.get("part_cosines", {}).items()})
        self.record_val(metrics, size)  # logged when the pass ends (on_validation_epoch_end)
        self._val_outputs.append(
            {
                "key": list(batch["key"]),
                "lang": list(batch["lang"]),
                "student": student["context"].detach().to("cpu", torch.float16),
                "teacher": teacher["context"].detach().to("cpu", torch.float16),
            }
        )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        outputs = [out for part in gather_objects(self._val_outputs) for out in part]
        self._val_outputs = []
        if self.trainer.sanity_checking or not outputs:
            return
        for name, value in retrieval_recall(outputs, pool_size=self.alignment_settings.retrieval_pool).items():
            # Every rank computed the same figures from the gathered features: averaging is a no-op.
            self.log(f"val/{name}", value, sync_dist=True)


class AdapterMismatch(ValueError):
    """The adapter's shape does not fit the LLM it reads or the base it feeds."""


def check_fit(prompt_encoder: PromptEncoder, teacher: CLIPTeacher, llm_name: str = "the LLM", base_name: str = "the base") -> None:
    """The adapter must read the LLM's width and produce exactly what the base consumes:
    say which key to change if not."""
    a = prompt_encoder.adapter.config
    width = prompt_encoder.text_encoder.hidden_size
    problems = []
    if a["llm_dim"] != width:
        problems.append(f"the adapter reads width {a['llm_dim']} but {llm_name} gives {width}")
    if a["dim"] != teacher.context_dim:
        problems.append(f"adapter.dim={a['dim']} but {base_name}'s text context is {teacher.context_dim} wide")
    if a["num_queries"] != teacher.context_tokens:
        problems.append(f"adapter.num_queries={a['num_queries']} but {base_name} reads {teacher.context_tokens} context tokens")
    if (a["pooled_dim"] or None) != (teacher.pooled_dim or None):
        problems.append(f"adapter.pooled_dim={a['pooled_dim']} but {base_name}'s pooled text feature is {teacher.pooled_dim}")
    if problems:
        raise AdapterMismatch("; ".join(problems))
