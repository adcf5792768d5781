"""CLIP for evaluation: the CLIP score (torchmetrics) and CLIP-space image similarity.

torchmetrics' CLIPScore loads a model only by a few hub names; any other CLIP (a local
folder, as offline clusters have) goes in through its callable form, as a
(model, processor) pair. Two adaptations are needed there:

- transformers 5 returns output objects from ``get_image_features`` / ``get_text_features``
  (a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding),
  where torchmetrics divides tensors: :class:`TensorFeaturesCLIP` hands it tensors, with
  older transformers' plain tensors passed through.
- prompts longer than CLIP's 77 tokens: torchmetrics warns and cuts the token ids, the
  same cut :class:`TruncatingProcessor` makes in the tokenizer (so EOS stays last). A long
  prompt is thereby scored against its first 77 tokens, all CLIP can read.

Demo runs are scored by :func:`demo_clip`, the committed tiny CLIP trained on the demo's own
pictures and English captions (``assets/demo_clip``, ``scripts/make_demo_clip.py``): its
numbers compare demo runs with each other. With no CLIP at hand for anything else,
:func:`stand_in_clip` builds a small random CLIPModel from a fixed seed: the code path is
the real one, the numbers are not, and the stand-in is recorded as such in metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

from linguadiff.config import PROJECT_ROOT, ConfigError
from evaluation.image_features import FeatureSpace

STAND_IN_TOKENIZER = PROJECT_ROOT / "assets" / "demo_base" / "tokenizer"
STAND_IN_SEED = 0
DEMO_CLIP = PROJECT_ROOT / "assets" / "demo_clip"
DEMO_CLIP_NAME = "demo_clip"
DEMO_CLIP_DESCRIPTION = ("the demo's own tiny CLIP (assets/demo_clip, trained on the demo's pictures and English "
                         "captions): ranks demo runs, not comparable with a real CLIP's scores")


def features_tensor(output: Any, modality: str) -> torch.Tensor:
    """The embedding tensor from whatever ``get_{image,text}_features`` returned.

    transformers < 5: the tensor itself; transformers 5: an output object carrying the
    projected embedding as ``pooler_output`` (``image_embeds`` / ``text_embeds`` in the
    ``*WithProjection`` models' outputs).
    """
    if isinstance(output, torch.Tensor):
        return output
    for name in (f"{modality}_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find {modality} embeddings in a {type(output).__name__} (no {modality}_embeds or pooler_output)")


class TensorFeaturesCLIP(nn.Module):
    """A CLIP model whose feature methods return tensors, as torchmetrics expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return features_tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs), "image")

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return features_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs), "text")


class TruncatingProcessor:
    """A CLIP processor that cuts every text to the model's `max_length` tokens (BOS ... EOS)."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(text=text, images=images, **kwargs)


@dataclass
class CLIPBundle:
    """A CLIP model + processor ready for the CLIP score and for image embeddings."""

    model: TensorFeaturesCLIP
    processor: TruncatingProcessor
    name: str
    stand_in: bool
    device: torch.device

    @property
    def max_length(self) -> int:
        return self.processor.max_length

    def score_metric(self) -> CLIPScore:
        """A torchmetrics CLIPScore on this model: max(mean of 100 x cos(image, text), 0)."""
        return CLIPScore(model_name_or_path=lambda: (self.model, self.processor))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> projected image embeddings [N, D] (float32, on the CLIP's device)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size].cpu())
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model.get_image_features(pixels).float())
        return torch.cat(out)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> L2-normalised embeddings [N, D] on the CPU."""
        return nn.functional.normalize(self.image_features(images), dim=-1).cpu()

    def token_ids(self, text: str) -> list[int]:
        """The prompt's tokens without BOS / EOS, uncut."""
        return self.processor.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def text_after_limit(self, text: str) -> str:
        """The part of `text` CLIP never reads: what follows its first `max_length` tokens
        (BOS + max_length - 2 prompt tokens + EOS), as text."""
        ids = self.token_ids(text)[self.max_length - 2 :]
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def feature_space(self) -> FeatureSpace:
        """CLIP image embeddings as the FID/KID feature space (option fid_features=clip)."""
        return FeatureSpace(f"clip:{self.name}", _CLIPImageFeatures(self), self.stand_in,
                            f"CLIP image embeddings of {self.name}" + (" (a stand-in CLIP)" if self.stand_in else ""))


class _CLIPImageFeatures(nn.Module):
    def __init__(self, bundle: CLIPBundle) -> None:
        super().__init__()
        self.bundle = bundle
        self.num_features = int(bundle.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bundle.image_features(images)


def _bundle(model: nn.Module, processor: Any, name: str, stand_in: bool, device: str | torch.device) -> CLIPBundle:
    max_length = int(model.config.text_config.max_position_embeddings)
    device = torch.device(device)
    return CLIPBundle(TensorFeaturesCLIP(model).to(device), TruncatingProcessor(processor, max_length), name, stand_in, device)


def load_clip(path: str, device: str | torch.device = "cpu") -> CLIPBundle:
    """A CLIPModel + CLIPProcessor from a local folder (or a hub name, when online)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        # float32 whatever the checkpoint stores: torchmetrics feeds the processor's float32 pixels as they are.
        model = CLIPModel.from_pretrained(path, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"option 'clip': cannot load a CLIP model and processor from {path!r} "
                          f"(a folder with config.json, weights, tokenizer and preprocessor files): {err}") from None
    return _bundle(model, processor, Path(path).name or str(path), stand_in=False, device=device)


def demo_clip(device: str | torch.device = "cpu") -> CLIPBundle:
    """The demo's own tiny CLIP (assets/demo_clip): knows the demo's coloured shapes and English
    caption words, so its scores rank demo runs; it is no stand-in there, and no real CLIP."""
    if not (DEMO_CLIP / "config.json").is_file():
        raise ConfigError(f"the demo's CLIP is missing from {DEMO_CLIP}: rebuild it with "
                          "python scripts/make_demo_clip.py, or give clip=PATH")
    bundle = load_clip(str(DEMO_CLIP), device)
    bundle.name = DEMO_CLIP_NAME
    return bundle


def stand_in_clip(device: str | torch.device = "cpu") -> CLIPBundle:
    """A small random CLIPModel (fixed seed) with the demo base's CLIP tokenizer: runs the CLIP
    score's real code path offline; its values mean nothing and are recorded as a stand-in."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = CLIPTokenizer.from_pretrained(STAND_IN_TOKENIZER)
    side = 32
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=side, patch_size=8),
        projection_dim=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(STAND_IN_SEED)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _bundle(model, processor, f"stand-in: random tiny CLIPModel (seed {STAND_IN_SEED})", stand_in=True, device=device)


@torch.no_grad()
def demo_caption_retrieval(bundle: CLIPBundle, images: torch.Tensor, labels: list[tuple[str, str]]) -> dict[str, float]:
    """How well a CLIP reads the demo: each uint8 [N, 3, H, W] image against the 12 plain English
    captions ("a red circle", every colour x shape); `labels` are the images' (colour, shape).

    Returns the share of images whose own caption ranks first (and whose first caption has the
    right colour / shape), and mean CLIP scores (100 x cosine, before torchmetrics' clamp at 0)
    of the matching caption, of the mismatched ones, of those of the same shape in another
    colour and of those of the same colour in another shape.
    """
    from datamodules import demo_data

    classes = [(c, s) for c in demo_data.COLOURS for s in demo_data.SHAPES]
    first = {}
    for prompt, colour, shape in demo_data.plain_prompts("en"):
        first.setdefault((colour, shape), prompt)
    tokens = bundle.processor(text=[first[k] for k in classes], padding=True, return_tensors="pt")
    text = bundle.model.get_text_features(tokens["input_ids"].to(bundle.device), tokens["attention_mask"].to(bundle.device))
    cosine = nn.functional.normalize(bundle.image_features(images), dim=-1) @ nn.functional.normalize(text.float(), dim=-1).T
    cosine = cosine.cpu()
    truth = torch.tensor([classes.index(tuple(label)) for label in labels])
    best = cosine.argmax(1)
    same_colour = torch.tensor([[a[0] == b[0] for b in classes] for a in classes])[truth]
    same_shape = torch.tensor([[a[1] == b[1] for b in classes] for a in classes])[truth]
    matching = nn.functional.one_hot(truth, len(classes)).bool()
    score = 100 * cosine
    return {
        "images": len(labels),
        "retrieval_accuracy": float((best == truth).float().mean()),
        "colour_accuracy": float(torch.tensor([classes[b][0] == classes[t][0] for b, t in zip(best, truth)]).float().mean()),
        "shape_accuracy": float(torch.tensor([classes[b][1] == classes[t][1] for b, t in zip(best, truth)]).float().mean()),
        "clip_score_matching": float(score[matching].mean()),
        "clip_score_mismatched": float(score[~matching].mean()),
        "clip_score_other_colour": float(score[same_shape & ~matching].mean()),
        "clip_score_other_shape": float(score[same_colour & ~matching].mean()),
    }


def image_tensors(images: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """uint8 [N, 3, H, W] -> the list of [3, H, W] tensors CLIPScore takes, on the CLIP's device
    (torchmetrics moves the model to where the images are)."""
    return [im for im in images.to(device)]


def cross_language_similarity(embeddings: dict[str, torch.Tensor], reference: str = "en") -> dict[str, float]:
    """Mean cosine between each language's image embeddings and the reference language's,
    row for row (same prompt, same seed): does the prompt draw the same picture in every language?

    `embeddings[lang]` is [N, D] with row i of every language from the same prompt and seed.
    """
    ref = nn.functional.normalize(embeddings[reference].float(), dim=-1)
    out = {}
    for lang, emb in embeddings.items():
        if lang == reference:
            continue
        if emb.shape != ref.shape:
            raise ValueError(f"{lang}: {tuple(emb.shape)} embeddings do not pair with {reference}'s {tuple(ref.shape)}")
        out[lang] = float((nn.functional.normalize(emb.float(), dim=-1) * ref).sum(-1).mean())
    return out
