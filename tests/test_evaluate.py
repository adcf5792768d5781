"""evaluate.py: every metric against a value computed by hand on a toy case, then end to end
on tiny runs (the demo pipeline and a diffusers SD1.5 one) with tiny CLIP stand-ins."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import evaluate
import train
from datamodules.demo_data import LANGUAGES, write_demo_shards
from linguadiff.config import PROJECT_ROOT, ConfigError
from evaluation import prompt_sets
from evaluation.aesthetic import AestheticHead
from evaluation.clip_models import cross_language_similarity, features_tensor, image_tensors, load_clip
from evaluation.image_features import DistributionDistance, FeatureSpace, PixelStatistics, feature_space
from evaluation.references import reference_batches
from evaluation.report import comparison_table
from evaluation.text_alignment import text_alignment_metrics
from linguadiff.offline_tokenizers import save_clip_tokenizer
from tests.test_stage1_training import assets, tiny_args  # noqa: F401  (module fixture)
from tests.tiny_models import make_tiny_sd_pipeline

# ----------------------------------------------------------------------------- hand computations


def frechet_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), square roots by eigh."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    root = sqrtm(s_a)
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * sqrtm(root @ s_b @ root).trace())


def kid_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """The unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over all samples."""
    a, b = a.double(), b.double()
    d, m = a.shape[1], a.shape[0]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    k_aa, k_bb, k_ab = k(a, a), k(b, b), k(a, b)
    off = (k_aa.sum() - k_aa.diag().sum()) + (k_bb.sum() - k_bb.diag().sum())
    return float(off / (m * (m - 1)) - 2 * k_ab.sum() / m**2)


class Flatten(nn.Module):
    """Identity-like features: the pixels themselves, in [0, 1]."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1) / 255.0


def random_images(n: int, side: int, high: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------- FID / KID


def test_identical_sets_give_fid_and_kid_near_zero_and_a_shift_gives_the_hand_fid():
    real = random_images(80, 8, high=200)
    same = DistributionDistance(FeatureSpace("pixels", PixelStatistics(), True, ""))
    same.update(real[:40], real=True)
    same.update(real[40:], real=True)
    same.update(real, real=False)
    values = same.compute()
    assert abs(values["fid"]) < 1e-4
    features = PixelStatistics()(real)
    assert values["kid_mean"] == pytest.approx(kid_by_hand(features, features), abs=1e-6)
    assert abs(values["kid_mean"]) < 1e-2 and values["kid_std"] < 1e-5  # all 80 in every subset

    # Adding 40 to every pixel shifts each of the 48 area means by 40/255 and leaves the covariance alone.
    same.reset_generated()  # the real side stays (comparison mode reads the reference once)
    same.update(real + 40, real=False)
    shifted = same.compute()
    assert shifted["fid"] == pytest.approx(48 * (40 / 255) ** 2, rel=1e-4)
    assert shifted["kid_mean"] > 10 * abs(values["kid_mean"])


def test_fid_and_kid_match_the_hand_computed_distances_on_identity_features():
    real = random_images(300, 2, seed=1)
    fake = random_images(300, 2, seed=2) // 2 + 100  # half the spread, brighter: FID about 0.5
    distance = DistributionDistance(FeatureSpace("identity", Flatten(12), False, ""))
    for start in range(0, 300, 64):  # batch by batch, as evaluation feeds it
        distance.update(real[start : start + 64], real=True)
        distance.update(fake[start : start + 64], real=False)
    values = distance.compute()
    a, b = Flatten(12)(real), Flatten(12)(fake)
    assert values["fid"] == pytest.approx(frechet_by_hand(a, b), rel=1e-4)
    assert values["fid"] > 0.3
    assert values["kid_mean"] == pytest.approx(kid_by_hand(a, b), rel=1e-4)


# ----------------------------------------------------------------------------- CLIP


def make_tiny_clip(path: Path, positive_with: tuple[torch.Tensor, list[str]] | None = None) -> Path:
    """A tiny CLIPModel + PIL image processor + offline CLIP tokenizer, saved with save_pretrained.
    With `positive_with` (images, texts), the image projection's sign is chosen so their mean
    cosine is positive: CLIPScore clamps at 0, and a test of 0 == 0 could not fail."""
    save_clip_tokenizer(path / "tokenizer", ("a", "red", "circle", "the", "and"))
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=24, patch_size=8),
        projection_dim=16,
    )
    torch.default_generator.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}),
                              tokenizer=tokenizer)
    if positive_with is not None and hand_cosines(model, processor, *positive_with).mean() < 0:
        with torch.no_grad():
            model.visual_projection.weight.neg_()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def hand_cosines(model: CLIPModel, processor: CLIPProcessor, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosine of each (image, text) pair through CLIP's towers and projections, called directly."""
    with torch.no_grad():
        pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.text_projection(model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output)
    return nn.functional.cosine_similarity(image, text, dim=-1)


@pytest.fixture(scope="module")
def clip_case(tmp_path_factory):
    images = random_images(3, 20, seed=3)
    texts = ["a red circle", "the blue square and a tree", "circle"]
    path = make_tiny_clip(tmp_path_factory.mktemp("clip"), positive_with=(images, texts))
    return path, images, texts


def test_clip_score_equals_100_times_the_hand_computed_cosine(clip_case):
    path, images, texts = clip_case
    bundle = load_clip(str(path))
    metric = bundle.score_metric()
    metric.update(image_tensors(images, bundle.device), texts)
    cos = hand_cosines(CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path), images, texts)
    assert cos.mean() > 0
    # torchmetrics: max(mean over pairs of 100 * cos, 0)
    assert float(metric.compute()) == pytest.approx(100 * float(cos.mean()), rel=1e-4)


def test_feature_outputs_of_transformers_5_and_older_give_the_embedding_tensor(clip_case):
    t = torch.randn(2, 4)
    assert features_tensor(t, "image") is t
    assert features_tensor(BaseModelOutputWithPooling(pooler_output=t), "image") is t
    assert features_tensor(type("Out", (), {"text_embeds": t, "pooler_output": None})(), "text") is t
    with pytest.raises(TypeError, match="no image_embeds or pooler_output"):
        features_tensor(object(), "image")
    bundle = load_clip(str(clip_case[0]))
    pixels = bundle.processor(images=list(clip_case[1]), return_tensors="pt")["pixel_values"]
    raw = bundle.model.model.get_image_features(pixel_values=pixels)
    wrapped = bundle.model.get_image_features(pixels)
    assert isinstance(wrapped, torch.Tensor) and wrapped.shape == (3, 16)
    assert torch.equal(wrapped, raw if isinstance(raw, torch.Tensor) else raw.pooler_output)


def test_long_prompts_are_scored_against_their_first_77_tokens(clip_case):
    path, images, _ = clip_case
    bundle = load_clip(str(path))
    long = "a red circle and the " * 30
    ids = bundle.token_ids(long)
    assert len(ids) == 150  # 5 tokens x 30
    cut = bundle.processor(text=[long], return_tensors="pt", padding=True)["input_ids"][0]
    tokenizer = bundle.processor.tokenizer
    assert cut.tolist() == [tokenizer.bos_token_id, *ids[:75], tokenizer.eos_token_id]
    # The score of the long prompt is the score of its first 75 prompt tokens, by hand.
    first_77 = tokenizer.decode(ids[:75])
    assert bundle.token_ids(first_77) == ids[:75]
    metric = bundle.score_metric()
    metric.update(image_tensors(images[:1], bundle.device), [long])
    cos = hand_cosines(CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path), images[:1], [first_77])
    assert float(metric.compute()) == pytest.approx(max(100 * float(cos[0]), 0.0), rel=1e-4, abs=1e-4)
    # What CLIP never reads is handed back as text for the second score.
    assert bundle.token_ids(bundle.text_after_limit(long)) == ids[75:]
    assert bundle.text_after_limit("a red circle") == ""


def test_bundled_long_prompts_are_past_clips_limit():
    """CLIP's pre-tokenizer split is a lower bound on its BPE tokens: at least 77 pieces each."""
    pieces = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")
    prompts = prompt_sets.read_long_prompts()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert min(len(pieces.findall(p.lower())) for p in prompts) >= 77


def test_cross_language_similarity_on_known_embeddings():
    embeddings = {"en": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                  "zh": torch.tensor([[0.6, 0.8], [0.0, 2.0]]),  # cos 0.6 and 1.0 (norms do not matter)
                  "fr": torch.tensor([[-1.0, 0.0], [1.0, 0.0]])}  # cos -1 and 0
    assert cross_language_similarity(embeddings) == pytest.approx({"zh": 0.8, "fr": -0.5})
    with pytest.raises(ValueError, match="do not pair"):
        cross_language_similarity({"en": torch.ones(2, 2), "de": torch.ones(3, 2)})


# ----------------------------------------------------------------------------- aesthetic head


def test_aesthetic_head_linear_and_mlp_layouts_give_the_hand_scores(tmp_path):
    embeddings = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True)  # [0.6, 0.8, 0], [0, 0, 1]
    linear = {"weight": torch.tensor([[1.0, 2.0, 3.0]]), "bias": torch.tensor([0.5])}
    torch.save(linear, tmp_path / "linear.pth")
    scores = AestheticHead.from_file(tmp_path / "linear.pth")(embeddings)
    assert scores.tolist() == pytest.approx([0.6 + 1.6 + 0.5, 3.0 + 0.5])

    # The improved predictor's layout: Linear layers at 0, 2, 4 (dropout between), no activations.
    w0, b0, w2, b2, w4, b4 = torch.randn(5, 3), torch.randn(5), torch.randn(2, 5), torch.randn(2), torch.randn(1, 2), torch.randn(1)
    save_file({"layers.0.weight": w0, "layers.0.bias": b0, "layers.2.weight": w2, "layers.2.bias": b2,
               "layers.4.weight": w4, "layers.4.bias": b4}, str(tmp_path / "mlp.safetensors"))
    expected = ((unit @ w0.T + b0) @ w2.T + b2) @ w4.T + b4
    assert torch.allclose(AestheticHead.from_file(tmp_path / "mlp.safetensors")(embeddings), expected.squeeze(-1), atol=1e-5)

    torch.save({"fc.weight": torch.randn(1, 3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="option 'aesthetic_head'.*layers.<i>.weight"):
        AestheticHead.from_file(tmp_path / "other.pth")


# ----------------------------------------------------------------------------- stage-1 text measures


def test_text_alignment_metrics_per_language_on_a_toy_case():
    """Teacher features are one-hot per key; English students find their own key, Chinese ones
    the next key (wrong for recall@1, right within the top 2 of the 4-key pool)."""
    eye = torch.eye(4).unsqueeze(1)  # [4 keys, 1 token, 4]
    keys = ["k0", "k1", "k2", "k3"]
    batches = [
        {"key": ["k0", "k1", "k0"], "lang": ["en", "en", "zh"]},
        {"key": ["k2", "k3", "k1", "k2", "k3"], "lang": ["en", "en", "zh", "zh", "zh"]},
    ]

    def teacher(batch):
        return {"context": torch.cat([eye[keys.index(k)] for k in batch["key"]]).unsqueeze(1), "pooled": None}

    def student(batch):
        rows = [eye[keys.index(k)] if lang == "en" else eye[(keys.index(k) + 1) % 4] * 0.5 + eye[keys.index(k)] * 0.4
                for k, lang in zip(batch["key"], batch["lang"])]
        return {"context": torch.cat(rows).unsqueeze(1), "pooled": None}

    def alignment(s, t):  # a loss with a known value: mean |s - t|, and the token cosine
        return {"loss": (s["context"] - t["context"]).abs().mean(),
                "cosine": nn.functional.cosine_similarity(s["context"], t["context"], dim=-1).mean()}

    metrics = text_alignment_metrics(batches, student, teacher, alignment, pool_size=4)
    # en: perfect. zh: each row is 0.4 on its key and 0.5 on the next: |diff| = (0.6 + 0.5) / 4.
    assert metrics["text/loss/en"] == pytest.approx(0.0) and metrics["text/cosine/en"] == pytest.approx(1.0)
    assert metrics["text/loss/zh"] == pytest.approx(1.1 / 4)
    assert metrics["text/cosine/zh"] == pytest.approx(0.4 / (0.4**2 + 0.5**2) ** 0.5)
    assert metrics["text/recall@1/en"] == 1.0 and metrics["text/recall@5/en"] == 1.0
    assert metrics["text/recall@1/zh"] == 0.0 and metrics["text/recall@5/zh"] == 1.0
    assert metrics["text/recall_pool_size"] == 4
    # A pool of 2 keeps only k0 and k1 for retrieval; the loss still covers every caption.
    small = text_alignment_metrics(batches, student, teacher, alignment, pool_size=2)
    assert small["text/recall_pool_size"] == 2 and small["text/loss/zh"] == metrics["text/loss/zh"]


# ----------------------------------------------------------------------------- prompt sets, references, table


def test_prompt_sets_and_caption_files(tmp_path):
    demo = prompt_sets.demo_parallel_set(list(LANGUAGES))
    assert len(demo) == 24 and len(demo.labels) == 24 and all(len(v) == 24 for v in demo.prompts.values())
    assert demo.prompts["en"][0] == "a red circle" and demo.prompts["zh"][0] == "一个红色的圆形"
    bundled = prompt_sets.read_parallel_file(prompt_sets.BUNDLED_PARALLEL, list(LANGUAGES))
    assert len(bundled) == 16 and all(len(set(v)) == 16 for v in bundled.prompts.values())

    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "A dog  on grass."},
                                                {"image_id": 2, "caption": "Two cats."},
                                                {"image_id": 1, "caption": "a dog again"}]}))
    assert prompt_sets.read_captions(coco) == ["A dog on grass.", "Two cats."]
    txt = tmp_path / "prompts.txt"
    txt.write_text("first\n\n second \n", encoding="utf-8")
    assert prompt_sets.read_captions(txt) == ["first", "second"]
    parallel = tmp_path / "parallel.json"
    parallel.write_text(json.dumps([{"en": "a cat", "zh": "一只猫"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match="entry 0 .* has no 'fr' prompt"):
        prompt_sets.read_parallel_file(parallel, ["en", "zh", "fr"])
    with pytest.raises(ConfigError, match="must include 'en'"):
        prompt_sets.demo_parallel_set(["zh"])


def test_reference_folder_images_and_captions(tmp_path):
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 20), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a blue picture\n")
    (tmp_path / "3.jpg").write_bytes(b"not an image")  # skipped and counted, never fatal
    batches = list(reference_batches(str(tmp_path), size=8, batch_size=2))
    images = torch.cat([b.images for b in batches])
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert images[0, :, 4, 4].tolist() == [255, 0, 0] and images[1, :, 4, 4].tolist() == [0, 0, 255]
    assert [c for b in batches for c in b.captions] == ["", "a blue picture", ""]
    assert sum(len(b.captions) for b in reference_batches(str(tmp_path), size=8, batch_size=2, limit=2)) == 2
    with pytest.raises(ConfigError, match="option 'reference' is neither a folder nor readable shards"):
        list(reference_batches(str(tmp_path / "missing-{0..1}.tar"), size=8, batch_size=2))


def test_comparison_table_rows_are_metrics_and_columns_runs():
    table = comparison_table(["stage2", "stage3"], [{"fid": 12.3456, "colour/zh": 0.958, "text/loss/zh": 0.1},
                                                    {"fid": 10.0, "colour/zh": 1.0, "kid_std": 0.002}])
    assert table.splitlines() == [
        "metric           stage2  stage3",
        "------------  -  ------  ------",
        "fid           ↓   12.35      10",
        "colour/zh     ↑   95.8%  100.0%",
        "text/loss/zh  ↓     0.1       -",
        "kid_std               -   0.002",
    ]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_data")
    write_demo_shards(root / "images", num_samples=24, samples_per_shard=24, seed=5, image_size=16, prefix="val", with_images=True)
    write_demo_shards(root / "images32", num_samples=12, samples_per_shard=12, seed=6, image_size=32, prefix="val", with_images=True)
    return {"images": root / "images" / "val-00000.tar", "images32": root / "images32" / "val-00000.tar"}


def demo_run(assets, run_dir: Path) -> Path:  # noqa: F811
    """A stage-1 run on the demo preset (committed demo base + demo LLM), 2 steps on tiny shards."""
    assert train.main([f"run_dir={run_dir}", f"data.train.urls={assets['train']}", f"data.val.urls={assets['val']}",
                       "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2"]) == 0
    return run_dir


def quick(**extra) -> list[str]:
    options = {"num_images": 1, "steps": 2, "fid_images": 16, "grid_prompts": 3, "batch_size": 64, **extra}
    return [f"{k}={v}" for k, v in options.items()]


def test_evaluate_compares_two_demo_runs_end_to_end(assets, eval_data, tmp_path, capsys):  # noqa: F811
    first = demo_run(assets, tmp_path / "runs" / "first")
    second = shutil.copytree(first, tmp_path / "runs" / "second")
    long_prompts = tmp_path / "long.txt"
    long_prompts.write_text("".join(f"a {c} circle on a white background, " * 15 + "\n" for c in ("red", "blue")), encoding="utf-8")
    # Every set but binding (tests/test_binding.py runs it end to end; its 72 demo prompts would triple the drawing here).
    code = evaluate.main([f"run_dir=[{first},{second}]", f"reference={eval_data['images']}", f"text={assets['val']}",
                          "languages=[en,zh,ja]", f"long_prompts={long_prompts}", "sets=[captions,multilingual,long,text]",
                          *quick()])
    assert code == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["metric", "first", "second"]

    reports = [json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8")) for run in (first, second)]
    metrics = reports[0]["metrics"]
    for key in ("fid", "kid_mean", "clip_score", "long/clip_score", "multilingual/image_cosine/non_english",
                "text/recall@1/zh", "text/recall@5/non_english", "text/loss/ja", "long/clip_score_beyond_77",
                *(f"{name}/{lang}" for name in ("colour", "shape", "demo_aesthetic", "multilingual/clip_score") for lang in ("en", "zh", "ja"))):
        assert key in metrics, key
    assert metrics["fid"] > 0 and 0 <= metrics["colour/zh"] <= 1 and 0 <= metrics["text/recall@1/zh"] <= 1
    assert "colour/fr" not in metrics and "text/loss/fr" in metrics  # text measures cover every language of the shards
    assert reports[0]["counts"]["fid/reference_images"] == 24 and reports[0]["counts"]["fid/generated_images"] == 16
    assert reports[0]["counts"]["long/prompts_beyond_77"] == 2
    assert reports[0]["stage"] == 1 and reports[0]["global_step"] == 2
    # Stand-ins are named in the file, so nobody compares these numbers with a paper's; demo runs
    # are scored by the demo's own CLIP (no clip= given), and the file says which CLIP that was.
    assert reports[0]["models"]["fid_features"]["stand_in"] and not reports[0]["models"]["clip"]["stand_in"]
    assert reports[0]["models"]["clip"]["name"] == "demo_clip" and "assets/demo_clip" in reports[0]["models"]["clip"]["description"]
    assert len(reports[0]["stand_ins"]) == 1 and "stand-in" in out
    assert reports[0]["skipped"]["aesthetic"].startswith("no aesthetic_head")
    # Same export, same seeds: the same numbers (the reference features were read once, for both).
    assert reports[1]["metrics"] == pytest.approx(metrics)

    grid = Image.open(first / "eval" / "grid.png")
    assert grid.size == (64 * 3, 64 * 3)  # 16 px tiles shown at 64: a column per language, a row per prompt
    events = EventAccumulator(str(first / "tensorboard" / "eval")).Reload()
    assert events.Scalars("eval/fid")[-1].step == 2
    assert events.Scalars("eval/fid")[-1].value == pytest.approx(metrics["fid"], rel=1e-5)
    assert "eval/colour/ja" in events.Tags()["scalars"] and events.Tags()["images"] == ["eval/grid"]


def test_the_base_with_its_own_clip_is_a_row_beside_the_runs(assets, tmp_path, capsys):  # noqa: F811
    """run_dir=[base,RUN]: the base the run's export names, drawn with its own CLIP on every
    language and the run's drawing settings; its report sits beside the run's."""
    run = demo_run(assets, tmp_path / "runs" / "llm")
    code = evaluate.main([f"run_dir=[base,{run}]", "sets=[multilingual,text]", "languages=[en,zh]", f"text={assets['val']}",
                          *quick(steps=1)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["metric", "base", "llm"]
    base_dir = tmp_path / "runs" / "base-demo_base"
    figure = tmp_path / "runs" / "comparison.png"  # beside the table: bars per language and run, the two grids
    assert f"figure: {figure}" in out and Image.open(figure).width > 2 * 64 * 2
    legend = json.loads(figure.with_suffix(".json").read_text(encoding="utf-8"))
    assert [r["label"] for r in legend["runs"]] == ["base", "llm"] and legend["panels"][:2] == ["colour", "shape"]
    report = json.loads((base_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    ours = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert report["stage"] == "base" and report["base_model"].endswith("demo_base")
    assert report["sampling"] == ours["sampling"] == {"scheduler": "ddim", "steps": 1, "guidance": 1.5}
    for key in ("colour/en", "colour/zh", "shape/zh", "multilingual/image_cosine/zh"):
        assert key in report["metrics"] and key in ours["metrics"], key
    assert "text/loss/zh" in ours["metrics"] and not any(k.startswith("text/") for k in report["metrics"])
    assert "text" in report["skipped"]
    assert Image.open(base_dir / "eval" / "grid.png").size == Image.open(run / "eval" / "grid.png").size
    assert EventAccumulator(str(base_dir / "tensorboard" / "eval")).Reload().Scalars("eval/colour/zh")

    # Alone, the base needs base=PATH; its kind and drawing defaults then come from the folder and the presets.
    assert evaluate.main(["run_dir=base"]) == 2
    assert "run_dir=base needs base=PATH" in capsys.readouterr().err
    alone = tmp_path / "alone"
    assert evaluate.main(["run_dir=base", f"base={PROJECT_ROOT / 'assets' / 'demo_base'}", f"base_dir={alone}", "sets=[multilingual]",
                          "languages=[en]", "tensorboard=false", *quick(steps=1)]) == 0
    report = json.loads((alone / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert report["sampling"] == {"scheduler": "ddim", "steps": 1, "guidance": 1.5} and "colour/en" in report["metrics"]


def test_evaluate_a_diffusers_sd15_run_with_a_local_clip(assets, eval_data, clip_case, tmp_path):  # noqa: F811
    """Not the demo: the bundled parallel set, a CLIP from a folder, no colour read-back."""
    base = make_tiny_sd_pipeline(tmp_path / "sd15", kind="sd15")
    run_dir = tmp_path / "run"
    args = tiny_args({**assets, "sd15": base}, run_dir, **{"trainer.max_steps": 2, "trainer.val_check_interval": 2})
    assert train.main(args) == 0
    head = tmp_path / "head.safetensors"  # a constant head (zero weights, bias 5): its mean is 5 whatever CLIP says
    save_file({"weight": torch.zeros(1, 16), "bias": torch.tensor([5.0])}, str(head))
    code = evaluate.main([f"run_dir={run_dir}", f"clip={clip_case[0]}", "sets=[captions,multilingual]", "languages=[en,zh]",
                          f"reference={eval_data['images32']}", "fid_features=clip", "tensorboard=false",
                          f"aesthetic_head={head}", *quick(fid_images=6, steps=1)])
    assert code == 0
    report = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert report["metrics"]["aesthetic"] == pytest.approx(5.0)
    assert set(report["metrics"]) == {"fid", "kid_mean", "kid_std", "clip_score", "aesthetic", "multilingual/clip_score/en",
                                      "multilingual/clip_score/zh", "multilingual/image_cosine/zh",
                                      "multilingual/image_cosine/non_english"}
    assert report["models"]["fid_features"]["name"].startswith("clip:") and report["stand_ins"] == []
    assert "colour" in report["skipped"] and report["counts"]["multilingual/images_per_language"] == 16
    assert Image.open(run_dir / "eval" / "grid.png").size == (64 * 2, 64 * 3)  # 32 px tiles, en and zh
    assert not (run_dir / "tensorboard" / "eval").exists()


def test_evaluate_explains_what_is_wrong(tmp_path, capsys):
    assert evaluate.main([f"run_dir={tmp_path}", "num_imgaes=2"]) == 2
    assert "unknown option 'num_imgaes' (did you mean 'num_images'?)" in capsys.readouterr().err
    assert evaluate.main([f"run_dir={tmp_path}"]) == 2
    assert "no adapter.safetensors" in capsys.readouterr().err
    assert evaluate.main([f"run_dir=[{tmp_path},{tmp_path / 'nope'}]"]) == 2
    assert f"run_dir {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert evaluate.main([]) == 2
    assert "option 'run_dir' is required" in capsys.readouterr().err


def test_inception_features_load_the_given_weights_or_say_which_option_to_set(monkeypatch):
    """torch-fidelity is not installed here: a stand-in class records what torchmetrics' Inception gets."""
    import torchmetrics.image.fid as tm_fid

    calls = []

    class FakeInception(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            calls.append(kwargs)
            if not str(kwargs["feature_extractor_weights_path"]).endswith(".pth"):
                raise FileNotFoundError(kwargs["feature_extractor_weights_path"])

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    space = feature_space("auto", "/models/weights-inception-2015-12-05-6726825d.pth", None)
    assert space.name == "inception-v3" and not space.stand_in and space.extract.num_features == 2048
    assert calls[-1] == {"name": "inception-v3-compat", "features_list": ["2048"],
                         "feature_extractor_weights_path": "/models/weights-inception-2015-12-05-6726825d.pth"}
    with pytest.raises(ConfigError, match="from inception_weights=/models/missing.*Offline, give inception_weights="):
        feature_space("inception", "/models/missing", None)


def test_an_aesthetic_head_of_another_width_than_the_clip_is_refused(clip_case, tmp_path):
    from evaluation.runner import EvalSettings, SharedTools

    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "vit_l_14_head.pth")
    settings = EvalSettings.from_args({**evaluate.OPTIONS, "clip": str(clip_case[0]),
                                       "aesthetic_head": str(tmp_path / "vit_l_14_head.pth")}, "cpu", "float32")
    with pytest.raises(ConfigError, match="reads 768-d embeddings but clip=.* gives 16-d ones"):
        SharedTools(settings).aesthetic


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed here")
def test_inception_without_torch_fidelity_names_the_options():
    with pytest.raises(ConfigError, match="fid_features=inception needs torch-fidelity.*fid_features=pixels"):
        feature_space("inception", "/models/weights.pth", None)
    assert feature_space("auto", None, None).stand_in  # offline without weights: the labelled stand-in
    with pytest.raises(ConfigError, match="fid_features=clip needs a CLIP model"):
        feature_space("clip", None, None)


def test_run_config_saved_before_new_keys_gets_todays_defaults(tmp_path):
    from omegaconf import OmegaConf

    from evaluation.runner import load_run_config

    OmegaConf.save(OmegaConf.create({"stage": 1, "run_dir": str(tmp_path), "loss": {"type": "mse"}}), tmp_path / "config.yaml")
    cfg = load_run_config(tmp_path)
    assert cfg.loss.type == "mse" and cfg.run_dir == str(tmp_path)  # the run's own settings win
    assert list(cfg.speed.compile) == [] and cfg.fsdp.sharding == "FULL_SHARD"  # keys added since: defaults
    assert load_run_config(tmp_path / "missing") is None
