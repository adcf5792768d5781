"""Attribute binding, the way T2I-CompBench scores it with BLIP-VQA.

Each prompt names two objects with an attribute each ("a red book and a yellow vase"). For
every image and object, a VQA model is asked the object's noun phrase as a yes/no question
("a red book?"); P(yes) is the object's score, their product the image's score (so an image
that draws a yellow book and a red vase scores low on both questions' product, even though
every word of the prompt is somewhere in it). Reported per category and language:

- ``binding/<category>/<lang>``: the mean image score (T2I-CompBench's number);
- ``binding_objects/<category>/<lang>``: the share of (image, object) pairs answered yes
  (P(yes) > 0.5), i.e. how often one object carries its own attribute.

Questions are always English (the structured items); each image is drawn from the prompt in
the language being measured. The VQA model: :class:`BlipVQA` (``BlipForQuestionAnswering`` from a
local folder, ``binding_vqa=PATH``, e.g. Salesforce/blip-vqa-base), or on the demo the pixel
read-back :class:`evaluation.demo_readback.DemoVQA`.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from PIL import Image

from evaluation.prompt_sets import BindingItem, BindingSet
from linguadiff.config import ConfigError

YES_THRESHOLD = 0.5


class VQA(Protocol):
    """Images + yes/no questions (one each) -> P(yes) per pair, in [0, 1]."""

    name: str
    stand_in: bool

    def __call__(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[float]: ...


def question(attribute: str, noun: str) -> str:
    """The noun phrase as a question, as T2I-CompBench asks it: "a red book?", "an orange cat?"."""
    phrase = f"{attribute} {noun}"
    article = "an" if phrase[:1].lower() in "aeiou" else "a"
    return f"{article} {phrase}?"


class BlipVQA:
    """BLIP-VQA from a local folder: P(yes) from the answer decoder's first token, the softmax
    over just the "yes" and "no" tokens (T2I-CompBench ranks exactly these two answers).
    Questions go in batches of one token length, unpadded: transformers 5.24's BLIP text layers
    drop the cross-attention mask (the layer hands it on as `attention_mask`, which the
    cross-attention replaces by its own, empty `encoder_attention_mask`), so the answer decoder
    would read a shorter question's padding and a batch would not give one-by-one numbers."""

    stand_in = False

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", batch_size: int = 32) -> None:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        try:
            self.model = BlipForQuestionAnswering.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
            self.processor = BlipProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"option 'binding_vqa': cannot load a BlipForQuestionAnswering model and BlipProcessor from "
                              f"{path!r} (a folder such as Salesforce/blip-vqa-base saved with save_pretrained): {err}") from None
        self.model.requires_grad_(False)
        self.name = f"BLIP-VQA from {path}"
        self.device, self.dtype, self.batch_size = torch.device(device), getattr(torch, dtype), batch_size
        tokenizer = self.processor.tokenizer
        ids = [tokenizer(word, add_special_tokens=False).input_ids for word in ("yes", "no")]
        if any(len(i) != 1 for i in ids):
            raise ConfigError(f"option 'binding_vqa': the tokenizer of {path} does not read 'yes' and 'no' as one token each")
        self.answer_ids = [i[0] for i in ids]

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[float]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        lengths = [len(ids) for ids in self.processor.tokenizer(list(questions)).input_ids]
        by_length: dict[int, list[int]] = defaultdict(list)
        for k, length in enumerate(lengths):
            by_length[length].append(k)
        out = [0.0] * len(questions)
        for group in by_length.values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                batch = self.processor(images=[images[k].convert("RGB") for k in chunk], text=[questions[k] for k in chunk],
                                       return_tensors="pt")
                for k, p in zip(chunk, self._p_yes(batch).tolist()):
                    out[k] = p
        return out

    def _p_yes(self, batch) -> torch.Tensor:
        model = self.model
        pixels = batch["pixel_values"].to(self.device, self.dtype)
        input_ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        question_embeds = model.text_encoder(input_ids=input_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                             encoder_attention_mask=image_mask).last_hidden_state
        start = torch.full((len(input_ids), 1), model.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=question_embeds, encoder_attention_mask=mask).logits
        return logits[:, 0, self.answer_ids].float().softmax(-1)[:, 0].cpu()


def score_binding(items: Sequence[BindingItem], drawn: Iterable[tuple[int, int, Image.Image]], vqa: VQA,
                  batch_size: int = 64) -> dict[str, dict[str, float | int]]:
    """(item index, image index, image) -> per category {"score": mean image score (product of
    the objects' P(yes)), "object_accuracy": share of objects answered yes, "images": n}."""
    pairs: list[tuple[int, Image.Image, str]] = []  # (image number, image, question)
    categories: list[str] = []
    for n, (i, _, image) in enumerate(drawn):
        categories.append(items[i].category)
        pairs += [(n, image, question(attribute, noun)) for attribute, noun in items[i].objects]
    p_yes: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        p_yes += vqa([image for _, image, _ in chunk], [q for _, _, q in chunk])
    image_score = [1.0] * len(categories)
    yes, asked = defaultdict(int), defaultdict(int)
    for (n, _, _), p in zip(pairs, p_yes, strict=True):
        image_score[n] *= p
        yes[categories[n]] += p > YES_THRESHOLD
        asked[categories[n]] += 1
    results: dict[str, dict[str, float | int]] = {}
    for category in dict.fromkeys(categories):
        scores = [s for s, c in zip(image_score, categories) if c == category]
        results[category] = {"score": sum(scores) / len(scores), "object_accuracy": yes[category] / asked[category],
                             "images": len(scores)}
    return results


def binding_set(drawer: Callable, languages: Sequence[str], bset: BindingSet, vqa: VQA, num_images: int, seed: int,
                batch_size: int) -> tuple[dict[str, float], dict[str, int]]:
    """Draw every binding prompt in every language (image j of item i from seed + i * num_images + j
    in every language) and score it: (metrics, counts) for the report."""
    metrics: dict[str, float] = {}
    seeds = [seed + i * num_images for i in range(len(bset))]
    for lang in languages:
        drawn = [d for chunk in drawer(bset.prompts(lang), seeds, num_images, f"binding {lang}") for d in chunk]
        for category, result in score_binding(bset.items, drawn, vqa, batch_size).items():
            metrics[f"binding/{category}/{lang}"] = result["score"]
            metrics[f"binding_objects/{category}/{lang}"] = result["object_accuracy"]
    per_category = defaultdict(int)
    for item in bset.items:
        per_category[item.category] += 1
    counts = {f"binding/{category}/prompts": n for category, n in per_category.items()}
    counts["binding/images_per_language"] = len(bset) * num_images
    return metrics, counts
