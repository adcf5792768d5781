"""CLIPTeacher / CLIPPromptTokenizer on tiny SD1.5- and SDXL-shaped diffusers folders."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from linguadiff.models.clip_teacher import CLIPTeacher
from linguadiff.models.frozen import is_frozen
from tests.tiny_models import make_tiny_sd_base

HIDDEN, HIDDEN_2, PROJECTION = 32, 48, 40
# The tiny CLIP tokenizer merges "red" and "blue" into one token each (tests/tiny_models.py).
SHORT = "red " * 50  # 50 tokens: all in window 1
LONG = "red " * 50 + "blue " * 50  # 100 tokens: 25 of them in window 2


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        kind: make_tiny_sd_base(root / kind, kind, hidden=HIDDEN, hidden_2=HIDDEN_2, projection_dim=PROJECTION)
        for kind in ("sd15", "sdxl")
    }


@pytest.fixture(scope="module")
def sd15(bases: dict[str, Path]) -> CLIPTeacher:
    return CLIPTeacher(bases["sd15"], "sd15")


@pytest.fixture(scope="module")
def sdxl(bases: dict[str, Path]) -> CLIPTeacher:
    return CLIPTeacher(bases["sdxl"], "sdxl")


def _standard_sdxl_prompt(base: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the SDXL pipeline feeds the UNet for a prompt of up to 75 tokens: (context [1, 77, D], pooled)."""
    features, pooled = [], None
    for sub, model_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder=f"tokenizer{sub}")
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model_cls.from_pretrained(base, subfolder=f"text_encoder{sub}")(ids, output_hidden_states=True)
        features.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", pooled)
    return torch.cat(features, dim=-1), pooled


def test_sd15_context_is_clip_last_hidden_state(bases: dict[str, Path], sd15: CLIPTeacher) -> None:
    assert (sd15.context_tokens, sd15.context_dim, sd15.pooled_dim) == (77, HIDDEN, None)
    out = sd15.encode(["a red cube", LONG])
    assert out["context"].shape == (2, 77, HIDDEN) and out["pooled"] is None
    tokenizer = CLIPTokenizer.from_pretrained(bases["sd15"], subfolder="tokenizer")
    ids = tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(bases["sd15"], subfolder="text_encoder")(ids).last_hidden_state
    torch.testing.assert_close(out["context"][:1], expected)


def test_sdxl_shapes_from_configs(sdxl: CLIPTeacher) -> None:
    assert (sdxl.context_tokens, sdxl.context_dim, sdxl.pooled_dim) == (227, HIDDEN + HIDDEN_2, PROJECTION)
    out = sdxl.encode(["a red cube", LONG])
    assert out["context"].shape == (2, 227, HIDDEN + HIDDEN_2)
    assert out["pooled"].shape == (2, PROJECTION)
    assert out["context"].dtype == out["pooled"].dtype == torch.float32


def test_sdxl_tokenizer_windows(sdxl: CLIPTeacher) -> None:
    tok = sdxl.tokenizer
    tokens = tok(["a red cube", LONG])
    assert tokens["input_ids"].shape == tokens["input_ids_2"].shape == (2, 3, 77)
    bos, eos, pad_2 = tok.tokenizer_2.bos_token_id, tok.tokenizer_2.eos_token_id, tok.tokenizer_2.pad_token_id
    ids_2 = tokens["input_ids_2"]
    assert (ids_2[:, :, 0] == bos).all()
    # LONG: window 1 full (EOS at 76), window 2 holds tokens 76..100 then EOS then "!" pads.
    assert ids_2[1, 0, 76] == eos and ids_2[1, 1, 26] == eos and (ids_2[1, 1, 27:] == pad_2).all()
    blue = tok.tokenizer_2("blue", add_special_tokens=False)["input_ids"]
    assert ids_2[1, 1, 1:26].tolist() == blue * 25
    # An empty window is BOS, EOS, pads: what SDXL feeds for an empty prompt.
    assert ids_2[0, 2, :2].tolist() == [bos, eos] and (ids_2[0, 2, 2:] == pad_2).all()


def test_sdxl_first_window_and_pooled_match_the_standard_pipeline(bases: dict[str, Path], sdxl: CLIPTeacher) -> None:
    out = sdxl.encode(["a red cube"])
    context, pooled = _standard_sdxl_prompt(bases["sdxl"], "a red cube")
    torch.testing.assert_close(out["context"][:, :76], context[:, :76])
    torch.testing.assert_close(out["pooled"], pooled)


def test_long_prompt_lands_in_second_window(sdxl: CLIPTeacher) -> None:
    short, long = sdxl.encode([SHORT, LONG])["context"].unbind(0)
    # Slots 1..75 hold window 1; CLIP is causal, so its first 50 tokens agree.
    torch.testing.assert_close(short[1:51], long[1:51])
    # Slots 76..150 hold window 2: "blue" tokens for LONG, an empty window for SHORT.
    window_2 = slice(76, 151)
    assert not torch.allclose(short[window_2], long[window_2], atol=1e-3)
    # Window 3 is empty for both.
    torch.testing.assert_close(short[151:], long[151:])


def test_sdxl_layout_bos_first_eos_last(sdxl: CLIPTeacher) -> None:
    full = "red " * 300  # fills all 3 windows (225 tokens, truncated)
    tokens = sdxl.tokenizer(["a red cube", full])
    assert (tokens["input_ids_2"][1, :, 76] == sdxl.tokenizer.tokenizer_2.eos_token_id).all()
    context = sdxl(tokens)["context"]
    # Each window encoded alone, as a plain 77-token prompt, by both encoders.
    with torch.no_grad():
        per_window = torch.cat(
            [
                sdxl.text_encoder(tokens["input_ids"][1], output_hidden_states=True).hidden_states[-2],
                sdxl.text_encoder_2(tokens["input_ids_2"][1], output_hidden_states=True).hidden_states[-2],
            ],
            dim=-1,
        )
    torch.testing.assert_close(context[1, 0], per_window[0, 0])  # BOS output of window 1
    torch.testing.assert_close(context[1, -1], per_window[2, 76])  # EOS output of window 3
    torch.testing.assert_close(context[1, 1:-1], per_window[:, 1:76].reshape(225, -1))
    # The BOS output depends on nothing after it (causal attention): same for every prompt.
    torch.testing.assert_close(context[0, 0], context[1, 0])


def test_tokenizer_is_picklable_and_model_free(sdxl: CLIPTeacher) -> None:
    clone = pickle.loads(pickle.dumps(sdxl.tokenizer))
    for key, value in sdxl.tokenizer([LONG]).items():
        assert torch.equal(clone([LONG])[key], value)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(clone).values())


def test_teachers_are_frozen(sd15: CLIPTeacher, sdxl: CLIPTeacher) -> None:
    for teacher in (sd15, sdxl):
        teacher.train()
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not any(m.training for m in teacher.modules())
    assert is_frozen(sdxl) and is_frozen(sdxl.text_encoder) and is_frozen(sdxl.text_encoder_2)


def test_unknown_kind_is_rejected(bases: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="sd15"):
        CLIPTeacher(bases["sd15"], "sd3")


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny_models import make_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_sd_pipeline(root / kind, kind=kind) for kind in ("sd15", "sdxl")}


@pytest.mark.parametrize("prompt", ["a red cube", LONG])
def test_sdxl_teacher_equals_the_diffusers_pipelines_own_encode_prompt(saved_pipelines, prompt) -> None:
    """Against StableDiffusionXLPipeline.encode_prompt itself (not a copy of its logic): the
    first window and the pooled vector, for a short prompt and one past 75 tokens (which the
    pipeline truncates to the first window)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(saved_pipelines["sdxl"])
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    out = CLIPTeacher(saved_pipelines["sdxl"], "sdxl").encode([prompt])
    torch.testing.assert_close(out["context"][:, :76], context[:, :76].float())
    torch.testing.assert_close(out["pooled"], pooled.float())


def test_sd15_teacher_equals_the_diffusers_pipelines_own_encode_prompt(saved_pipelines) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved_pipelines["sd15"], safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        context, _ = pipe.encode_prompt([SHORT, LONG], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(CLIPTeacher(saved_pipelines["sd15"], "sd15").encode([SHORT, LONG])["context"], context.float())


def test_stage1_llm_input_ends_where_the_teachers_does(bases: dict[str, Path], sd15: CLIPTeacher, sdxl: CLIPTeacher,
                                                        tmp_path: Path) -> None:
    """A caption past the teacher's limit: the LLM in stage 1 reads exactly the words the
    teacher read (issue 14.4); short captions and inference are untouched."""
    from linguadiff.models.clip_teacher import TeacherBoundedTokenizer, llm_text_for_teacher
    from linguadiff.models.text_encoder import PromptTokenizer
    from tests.tiny_models import make_tiny_llm

    llm = PromptTokenizer(str(make_tiny_llm(tmp_path / "llm", "llama", positions=2048)), max_length=2000)
    caption = " ".join(f"a red cube number {i} and blue" for i in range(60))  # far past 225 CLIP tokens
    for teacher, limit in ((sd15, 75), (sdxl, 225)):
        clip = teacher.tokenizer
        all_ids = clip.tokenizer(caption, add_special_tokens=False, verbose=False)["input_ids"]
        assert len(all_ids) > limit
        tokens = TeacherBoundedTokenizer(llm, clip)([caption], [caption])
        ids = tokens["input_ids"][0].tolist()
        assert ids[0] == llm.bos_id
        seen = llm.tokenizer.decode(ids[1:])  # byte-level: decodes to the exact text
        assert caption.startswith(seen) and caption[len(seen)] == " "
        seen_ids = clip.tokenizer(seen, add_special_tokens=False)["input_ids"]
        next_word = caption[: caption.index(" ", len(seen) + 1)]
        assert seen_ids == all_ids[: len(seen_ids)] and len(seen_ids) <= limit  # what the teacher read, in order
        assert len(clip.tokenizer(next_word, add_special_tokens=False, verbose=False)["input_ids"]) > limit  # and no more
        if teacher is sd15:  # the teacher's own ids: BOS, the same tokens, then the word it cut
            assert clip([caption])["input_ids"][0, 1 : 1 + len(seen_ids)].tolist() == seen_ids
        # Untouched: short captions, and the LLM without the teacher's text (inference).
        assert TeacherBoundedTokenizer(llm, clip)(["a red cube"], ["a red cube"])["input_ids"].equal(llm(["a red cube"])["input_ids"])
        assert TeacherBoundedTokenizer(llm, clip)([caption])["input_ids"].equal(llm([caption])["input_ids"])
    # A parallel pair: the other language is cut at the English's fraction, at a space.
    english, other = "one two three four", "un deux trois quatre cinq six"
    assert llm_text_for_teacher(other, english, "one two") == "un deux"  # 7/18 of 29 characters = 11, back to a space
    assert llm_text_for_teacher(other, english, english) == other
    assert llm_text_for_teacher("一二三四五六七八", english, "one two") == "一二三"  # no spaces: by characters
