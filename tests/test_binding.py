"""Attribute binding: the scorer against hand-made VQA answers, BLIP-VQA loaded from a folder,
the demo's read-back of two-object images, and the binding prompt file's checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo_data import RGB
from evaluation import prompt_sets
from evaluation.binding import BlipVQA, binding_set, question, score_binding
from evaluation.demo_readback import DemoVQA, read_objects
from evaluation.prompt_sets import BindingItem, BindingSet
from linguadiff.config import ConfigError

# ----------------------------------------------------------------------------- the scorer


class TableVQA:
    """Answers from a table {(image tag, question): P(yes)}; each image carries its tag in `info`."""

    name, stand_in = "table", True

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table, self.asked = table, []

    def __call__(self, images, questions):
        self.asked.append(len(questions))
        return [self.table[(im.info["tag"], q)] for im, q in zip(images, questions)]


def tagged(tag: str) -> Image.Image:
    image = Image.new("RGB", (4, 4))
    image.info["tag"] = tag
    return image


ITEMS = [
    BindingItem("colour", (("red", "book"), ("yellow", "vase")), {"en": "a red book and a yellow vase"}),
    BindingItem("texture", (("wooden", "table"), ("metallic", "chair")), {"en": "a wooden table and a metallic chair"}),
]


def test_image_scores_are_products_of_p_yes_and_objects_count_when_above_one_half():
    table = {
        ("a", "a red book?"): 0.9, ("a", "a yellow vase?"): 0.8,  # right: score 0.72, both yes
        ("b", "a red book?"): 0.6, ("b", "a yellow vase?"): 0.1,  # half right: 0.06, one yes
        ("c", "a wooden table?"): 0.5, ("c", "a metallic chair?"): 0.4,  # 0.5 is not a yes: 0.2, none
    }
    vqa = TableVQA(table)
    drawn = [(0, 0, tagged("a")), (0, 1, tagged("b")), (1, 0, tagged("c"))]
    results = score_binding(ITEMS, drawn, vqa, batch_size=4)
    assert results["colour"] == {"score": pytest.approx((0.72 + 0.06) / 2), "object_accuracy": 3 / 4, "images": 2}
    assert results["texture"] == {"score": pytest.approx(0.2), "object_accuracy": 0.0, "images": 1}
    assert vqa.asked == [4, 2]  # six questions in batches of four


def test_binding_set_scores_every_language_from_the_same_seeds():
    bset = BindingSet("toy", [BindingItem("colour", (("red", "book"), ("blue", "cup")), {"en": "EN", "zh": "ZH"})])
    calls = []

    def drawer(prompts, seeds, num_images, label):  # the runner's Drawer: chunks of (prompt, image, PIL image)
        calls.append((prompts, seeds, num_images))
        yield [(0, j, tagged(f"{prompts[0]}{j}")) for j in range(num_images)]

    table = {(f"{lang}{j}", q): p for lang, ps in (("EN", (1.0, 1.0, 0.0, 1.0)), ("ZH", (0.5, 0.25, 0.75, 1.0)))
             for j in range(2) for q, p in zip(("a red book?", "a blue cup?"), ps[2 * j: 2 * j + 2])}
    metrics, counts = binding_set(drawer, ["en", "zh"], bset, TableVQA(table), num_images=2, seed=7, batch_size=8)
    assert calls == [(["EN"], [7], 2), (["ZH"], [7], 2)]
    assert metrics == {"binding/colour/en": pytest.approx(0.5), "binding_objects/colour/en": 0.75,
                       "binding/colour/zh": pytest.approx((0.125 + 0.75) / 2), "binding_objects/colour/zh": 0.5}
    assert counts == {"binding/colour/prompts": 1, "binding/images_per_language": 2}


def test_questions_are_the_noun_phrases():
    assert [question("red", "book"), question("orange", "fish"), question("oval", "rug")] == ["a red book?", "an orange fish?",
                                                                                              "an oval rug?"]


# ----------------------------------------------------------------------------- BLIP-VQA from a folder


def make_tiny_blip(path: Path) -> Path:
    """A random BlipForQuestionAnswering with a word-level BERT tokenizer, saved like a real checkpoint."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "a", "an", "?", "red", "blue", "book",
             "cup", "orange", "fish"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, bos_token_id=5, pad_token_id=0, sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=24,
                           patch_size=8),
    )
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 24, "width": 24}), tokenizer=tokenizer).save_pretrained(path)
    return path


def test_blip_vqa_loads_from_a_folder_and_batches_give_the_one_by_one_numbers(tmp_path):
    path = make_tiny_blip(tmp_path / "blip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
    questions = ["a red book?", "an orange fish?", "a blue cup?", "a red red red blue cup?", "a book?"]  # padded in a batch
    batched = BlipVQA(str(path), batch_size=5)(images, questions)
    single = BlipVQA(str(path), batch_size=1)(images, questions)
    assert len(batched) == 5 and all(0.0 <= p <= 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert max(batched) - min(batched) > 1e-4  # the answers depend on the image and question, not a constant

    with pytest.raises(ConfigError, match="option 'binding_vqa': cannot load"):
        BlipVQA(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- the demo's read-back


def draw(objects: list[tuple[str, str, int, int]], side: int = 16, background: int = 128) -> Image.Image:
    """Hand-drawn shapes (colour, shape, centre x, centre y), 6 px across, on a grey background."""
    canvas = np.full((side, side, 3), background, np.uint8)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    for colour, shape, cx, cy in objects:
        dx, dy = xx - cx, yy - cy
        if shape == "square":
            mask = (np.abs(dx) < 3) & (np.abs(dy) < 3)
        elif shape == "circle":
            mask = dx**2 + dy**2 <= 3.3**2
        else:  # triangle, apex up
            mask = (dy >= -3) & (dy < 3) & (np.abs(dx) <= (dy + 3) / 2)
        canvas[mask] = RGB[colour]
    return Image.fromarray(canvas)


def test_read_objects_finds_each_shape_with_its_colour_shape_centre_and_size():
    objects = read_objects(draw([("blue", "square", 12, 8), ("red", "circle", 4, 8)]))
    assert [(o.colour, o.shape) for o in objects] == [("red", "circle"), ("blue", "square")]  # left to right
    assert objects[0].centre == pytest.approx((3.5, 7.5), abs=0.5) and objects[1].centre == pytest.approx((11.5, 7.5))
    assert objects[1].size == 36 and 26 <= objects[0].size <= 36
    triangle = read_objects(draw([("yellow", "triangle", 4, 8), ("green", "square", 12, 8)]))
    assert [(o.colour, o.shape) for o in triangle] == [("yellow", "triangle"), ("green", "square")]
    assert read_objects(Image.new("RGB", (16, 16), (200, 200, 200))) == []
    specks = np.full((16, 16, 3), 128, np.uint8)
    specks[0, 0] = specks[15, 15] = RGB["red"]  # single saturated pixels are noise, not objects
    assert read_objects(specks) == []


def test_read_objects_recovers_both_shapes_of_rendered_pair_scenes():
    # Measured on 600 pair scenes at 16 px: both objects found in all, colour 100%, shape 98%.
    import random

    from datamodules import demo_data

    rng = random.Random(0)
    scenes = [demo_data.sample_pair_scene(rng) for _ in range(150)]
    read = [read_objects(demo_data.render(scene, 16, rng)) for scene in scenes]
    assert all(len(objects) == 2 for objects in read)
    truth = [sorted(scene.objects, key=lambda o: o.cx) for scene in scenes]  # read_objects goes left to right
    pairs = [(o, s) for objects, shapes in zip(read, truth) for o, s in zip(objects, shapes)]
    assert all(o.colour == s.colour for o, s in pairs)
    assert sum(o.shape == s.shape for o, s in pairs) / len(pairs) >= 0.94


def test_demo_vqa_says_yes_only_for_an_object_with_both_attributes():
    image = draw([("red", "circle", 4, 8), ("blue", "square", 12, 8)])
    questions = ["a red circle?", "a blue square?", "a blue circle?", "a red square?", "a green triangle?"]
    assert DemoVQA()([image] * 5, questions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="a <colour> <shape>"):
        DemoVQA()([image], ["a wooden table?"])


# ----------------------------------------------------------------------------- the prompt file


def test_bundled_binding_prompts_cover_every_category_and_language():
    bset = prompt_sets.read_binding_file(prompt_sets.BUNDLED_BINDING, ["en", "zh", "fr", "de", "es", "ja"])
    assert bset.name == "binding"
    for category in prompt_sets.BINDING_CATEGORIES:
        assert sum(item.category == category for item in bset.items) >= 20
    for item in bset.items:  # the English prompt names every object the questions ask about
        assert all(f"{attribute} {noun}" in item.prompts["en"] for attribute, noun in item.objects)
    assert len({item.prompts["ja"] for item in bset.items}) == len(bset)


def test_demo_binding_set_is_the_demos_two_shape_scenes_in_every_language():
    from datamodules.demo_data import LANGUAGES

    bset = prompt_sets.demo_binding_set(list(LANGUAGES))
    assert bset.name == "demo" and len(bset) == 72 and {item.category for item in bset.items} == {"colour"}
    first = bset.items[0]
    assert len(first.objects) == 2 and first.objects[0] != first.objects[1]
    assert "red" in first.prompts["en"] and len({first.prompts[lang] for lang in LANGUAGES}) == len(LANGUAGES)


@pytest.mark.parametrize("item, message", [
    ({"category": "size", "objects": [], "prompts": {}}, "item 1 of .*'category' must be one of colour, shape, texture"),
    ({"category": "colour", "objects": [{"attribute": "red", "noun": "book"}], "prompts": {"en": "x"}},
     "item 1 of .*'objects' must list at least two"),
    ({"category": "colour", "objects": [{"attribute": "red", "noun": "book"}, {"attribute": "", "noun": "cup"}],
      "prompts": {"en": "x"}}, "item 1 of .*object 1 needs a non-empty English 'attribute' and 'noun'"),
    ({"category": "colour", "objects": [{"attribute": "red", "noun": "book"}, {"attribute": "blue", "noun": "cup"}],
      "prompts": {"en": "a red book and a blue cup"}}, "item 1 of .* has no 'zh' prompt"),
])
def test_binding_file_errors_name_the_file_and_item(tmp_path, item, message):
    good = {"category": "colour", "objects": [{"attribute": "red", "noun": "book"}, {"attribute": "blue", "noun": "cup"}],
            "prompts": {"en": "a red book and a blue cup", "zh": "一本红色的书和一个蓝色的杯子"}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([good, item], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as err:
        prompt_sets.read_binding_file(path, ["en", "zh"])
    assert str(path) in str(err.value)
    path.write_text("[1,", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid json"):
        prompt_sets.read_binding_file(path, ["en"])


# ----------------------------------------------------------------------------- evaluate.py


def test_evaluate_scores_the_demo_binding_set_and_skips_the_bundled_one_without_a_vqa(tmp_path, monkeypatch, capsys):
    """The demo base with its own CLIP (no training needed) on two-object prompts in two
    languages; the scores reach metrics.json, the table and TensorBoard."""
    import evaluate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datamodules import demo_data
    from linguadiff.config import PROJECT_ROOT

    scenes = [[("red", "circle"), ("blue", "square")], [("green", "triangle"), ("yellow", "circle")]]  # 2 of the 72, to stay fast
    words = {"en": "and", "zh": "和"}
    monkeypatch.setattr(demo_data, "binding_prompts", lambda lang: [
        (f" {words[lang]} ".join(f"{c} {s}" for c, s in objects), objects) for objects in scenes], raising=False)
    base = PROJECT_ROOT / "assets" / "demo_base"
    out = tmp_path / "base"
    args = [f"base={base}", f"base_dir={out}", "languages=[en,zh]", "num_images=2", "steps=2", "batch_size=8"]
    assert evaluate.main(["run_dir=base", "sets=[binding]", *args]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    keys = {f"{name}/colour/{lang}" for name in ("binding", "binding_objects") for lang in ("en", "zh")}
    assert set(report["metrics"]) == keys
    assert all(0.0 <= report["metrics"][k] <= 1.0 for k in keys)
    assert report["counts"] == {"binding/colour/prompts": 2, "binding/images_per_language": 4}
    assert report["models"]["binding_vqa"]["stand_in"] and "binding_vqa: demo read-back" in " ".join(report["stand_ins"])
    assert "binding_objects/colour/zh" in table
    assert "eval/binding/colour/zh" in EventAccumulator(str(out / "tensorboard" / "eval")).Reload().Tags()["scalars"]

    assert evaluate.main(["run_dir=base", "sets=[binding]", "binding=bundled", "tensorboard=false", *args]) == 0
    report = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert report["metrics"] == {} and report["skipped"]["binding"].startswith("no binding_vqa=PATH")
