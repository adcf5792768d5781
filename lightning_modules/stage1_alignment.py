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
from collections import defaultdict
from typing import Any

import torch
from omegaconf import DictConfig

from linguadiff.models.adapter import QueryAdapter
from lightning_modules.base import StageModule
from linguadiff.models.clip_teacher import CLIPTeacher, TeacherBoundedTokenizer, teacher_kind
from linguadiff.models.losses import ALIGNMENT_LOSSES, alignment_loss_from_config, token_cosine_similarity
from linguadiff.models.text_encoder import LLMTextEncoder, encode_by_length
from linguadiff.config import ConfigError
from linguadiff.distributed import gather_objects
from linguadiff.strategy import llm_device

log = logging.getLogger(__name__)


class Stage1Alignment(StageModule):
    def __init__(self, cfg: DictConfig, text_encoder: LLMTextEncoder, teacher: CLIPTeacher, adapter: QueryAdapter) -> None:
        super().__init__(cfg)
        check_shapes(cfg, text_encoder, teacher, adapter)
        self.text_encoder = text_encoder
        self.teacher = teacher
        self.adapter = adapter
        self.apply_trainable()
        self.apply_speed_options()
        if cfg.loss.type not in ALIGNMENT_LOSSES:
            raise ConfigError(f"config key 'loss.type' must be one of {sorted(ALIGNMENT_LOSSES)}, got {cfg.loss.type!r}")
        self.alignment_loss = alignment_loss_from_config(cfg.loss, teacher.context_parts)
        self._val_outputs: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Stage1Alignment":
        """Load the LLM and the base's CLIP teacher (from_pretrained) and build a fresh adapter."""
        text_encoder = LLMTextEncoder.from_settings(cfg.llm, device=llm_device(cfg))
        teacher = CLIPTeacher(cfg.model.path, kind=teacher_kind(cfg.model.kind), dtype=cfg.model.dtype)
        a = cfg.adapter
        adapter = QueryAdapter(
            llm_dim=text_encoder.hidden_size,
            dim=a.dim,
            num_queries=a.num_queries,
            encoder_layers=a.encoder_layers,
            decoder_layers=a.decoder_layers,
            heads=a.heads,
            ffn_dim=a.ffn_dim,
            pooled_dim=a.pooled_dim,
        )
        return cls(cfg, text_encoder, teacher, adapter)

    def tokenizers(self) -> dict[str, Any]:
        """Picklable tokenizers the data workers run (no model inside)."""
        # The LLM reads only what the teacher read of each caption (README: long prompts).
        return {"teacher": self.teacher.tokenizer, "student": TeacherBoundedTokenizer(self.text_encoder.tokenizer, self.teacher.tokenizer)}

    # ------------------------------------------------------------------ forward

    def student(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """LLM + adapter, run per group of similar prompt lengths (same result, less padding)."""
        return encode_by_length(self.text_encoder, self.adapter, tokens["input_ids"], tokens["attention_mask"],
                                grouped=not self.sharded)

    def alignment(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        return self.alignment_loss(student, teacher)

    def _empty_prompt(self) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
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
        if self.cfg.loss.empty_prompt_weight > 0:
            features, target = self._empty_prompt()
            empty = self.alignment(self.adapter(*features), target)
            loss = loss + self.cfg.loss.empty_prompt_weight * empty["loss"]
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
        size = self.batch_size_of(batch)
        teacher = self.teacher(self._tokens(batch, "teacher"))
        student = self.student(self._tokens(batch, "student"))
        out = self.alignment(student, teacher)
        if batch.get("padding"):  # an FSDP rank's filler batch: run, not counted
            return
        self.log("val/loss", out["loss"], batch_size=size, sync_dist=True)
        self.log("val/cosine", out["cosine"], batch_size=size, sync_dist=True)
        for part, cosine in out.get("part_cosines", {}).items():
            self.log(f"val/cosine_{part}", cosine, batch_size=size, sync_dist=True)
        self._val_outputs.append(
            {
                "key": list(batch["key"]),
                "lang": list(batch["lang"]),
                "student": student["context"].detach().to("cpu", torch.float16),
                "teacher": teacher["context"].detach().to("cpu", torch.float16),
            }
        )

    def on_validation_epoch_end(self) -> None:
        outputs = [out for part in gather_objects(self._val_outputs) for out in part]
        self._val_outputs = []
        if self.trainer.sanity_checking or not outputs:
            return
        for name, value in retrieval_recall(outputs, pool_size=self.cfg.eval.retrieval_pool).items():
            # Every rank computed the same figures from the gathered features: averaging is a no-op.
            self.log(f"val/{name}", value, sync_dist=True)


def retrieval_recall(outputs: list[dict[str, Any]], pool_size: int) -> dict[str, float]:
    """Recall@1/@5 per language: a caption's student output must rank its own English teacher
    output first (in the top 5) among the teacher outputs of up to `pool_size` held-out keys."""
    teacher_by_key: dict[str, torch.Tensor] = {}
    student_by_lang: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for out in outputs:
        for i, (key, lang) in enumerate(zip(out["key"], out["lang"])):
            if key not in teacher_by_key and len(teacher_by_key) < pool_size:
                teacher_by_key[key] = out["teacher"][i]
            student_by_lang[lang].append((key, out["student"][i]))
    keys = list(teacher_by_key)
    if not keys:
        return {}
    index = {k: i for i, k in enumerate(keys)}
    pool = torch.stack([teacher_by_key[k] for k in keys])
    metrics: dict[str, float] = {}
    non_english = []
    for lang, items in sorted(student_by_lang.items()):
        items = [(k, s) for k, s in items if k in index]
        if not items:
            continue
        sims = token_cosine_similarity(torch.stack([s for _, s in items]), pool)
        target = torch.tensor([index[k] for k, _ in items])
        rank = (sims > sims[torch.arange(len(items)), target].unsqueeze(1)).sum(1)
        metrics[f"recall@1/{lang}"] = (rank < 1).float().mean().item()
        metrics[f"recall@5/{lang}"] = (rank < 5).float().mean().item()
        if lang != "en":
            non_english.append(lang)
    if non_english:
        for k in (1, 5):
            metrics[f"recall@{k}/non_english"] = sum(metrics[f"recall@{k}/{l}"] for l in non_english) / len(non_english)
    metrics["recall_pool_size"] = float(len(keys))
    return metrics


def check_shapes(cfg: DictConfig, text_encoder: LLMTextEncoder, teacher: CLIPTeacher, adapter: QueryAdapter) -> None:
    """The adapter must produce exactly what the base consumes: say which key to change if not."""
    a = adapter.config
    problems = []
    if a["llm_dim"] != text_encoder.hidden_size:
        problems.append(f"the adapter reads width {a['llm_dim']} but {cfg.llm.name} gives {text_encoder.hidden_size}")
    if a["dim"] != teacher.context_dim:
        problems.append(f"adapter.dim={a['dim']} but {cfg.model.name}'s text context is {teacher.context_dim} wide")
    if a["num_queries"] != teacher.context_tokens:
        problems.append(f"adapter.num_queries={a['num_queries']} but {cfg.model.name} reads {teacher.context_tokens} context tokens")
    if (a["pooled_dim"] or None) != (teacher.pooled_dim or None):
        problems.append(f"adapter.pooled_dim={a['pooled_dim']} but {cfg.model.name}'s pooled text feature is {teacher.pooled_dim}")
    if problems:
        raise ConfigError("the adapter does not fit the base model: " + "; ".join(problems))
