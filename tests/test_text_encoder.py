"""LLMTextEncoder / PromptTokenizer on tiny Llama-, Qwen2- and T5-like models loaded with from_pretrained."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linguadiff.models.frozen import freeze, is_frozen
from linguadiff.models.text_encoder import LLMTextEncoder, PromptTokenizer
from tests.tiny_models import make_tiny_llm

KINDS = ("llama", "qwen2", "t5")
HIDDEN = 32
LAYERS = 2
PROMPTS = ["a red cube", "a small blue sphere on a wooden table, studio light"]


@pytest.fixture(scope="module")
def llm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    paths = {kind: make_tiny_llm(root / kind, kind, hidden=HIDDEN, layers=LAYERS) for kind in KINDS}
    paths["llama_no_auto_bos"] = make_tiny_llm(root / "llama_no_auto_bos", "llama", tokenizer_adds_bos=False)
    paths["qwen2_no_config_bos"] = make_tiny_llm(root / "qwen2_no_config_bos", "qwen2", config_bos=False)
    return paths


@pytest.fixture(scope="module")
def encoders(llm_paths: dict[str, Path]) -> dict[str, LLMTextEncoder]:
    return {kind: LLMTextEncoder(str(llm_paths[kind])) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_loads_base_model_without_head(encoders: dict[str, LLMTextEncoder], kind: str) -> None:
    expected = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "t5": "T5EncoderModel"}[kind]
    assert type(encoders[kind].model).__name__ == expected


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_mask(encoders: dict[str, LLMTextEncoder], kind: str) -> None:
    encoder = encoders[kind]
    tokens = encoder.tokenizer(PROMPTS)
    assert tokens["input_ids"].dtype == tokens["attention_mask"].dtype == torch.long
    features, mask = encoder(tokens["input_ids"], tokens["attention_mask"])
    batch, length = tokens["input_ids"].shape
    assert features.shape == (batch, length, HIDDEN) == (batch, length, encoder.hidden_size)
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(mask, tokens["attention_mask"].bool())
    assert mask[1].all() and not mask[0].all()  # right padding of the shorter prompt
    assert (features[~mask] == 0).all()
    assert encoder.name == str(encoder.tokenizer.path_or_name)


@pytest.mark.parametrize("kind", KINDS)
def test_last_layer_is_models_last_hidden_state(llm_paths: dict[str, Path], encoders: dict[str, LLMTextEncoder],
                                                kind: str) -> None:
    encoder = encoders[kind]
    tokens = encoder.tokenizer(PROMPTS[1:])
    features, _ = encoder(**tokens)
    with torch.no_grad():
        out = encoder.model(**tokens)
    # -1 is what the model returns as last_hidden_state: after the final norm.
    torch.testing.assert_close(features, out.last_hidden_state)
    by_positive_index = LLMTextEncoder(str(llm_paths[kind]), layers=(LAYERS,))
    torch.testing.assert_close(by_positive_index(**tokens)[0], features)
    # 0 is the embedding output.
    embeddings = LLMTextEncoder(str(llm_paths[kind]), layers=(0,))
    with torch.no_grad():
        expected = encoder.model.get_input_embeddings()(tokens["input_ids"])
    torch.testing.assert_close(embeddings(**tokens)[0], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_mix_mean_and_concat(llm_paths: dict[str, Path], kind: str) -> None:
    path = str(llm_paths[kind])
    tokens = PromptTokenizer(path)(PROMPTS)
    first, _ = LLMTextEncoder(path, layers=(1,))(**tokens)
    last, _ = LLMTextEncoder(path, layers=(-1,))(**tokens)
    mean = LLMTextEncoder(path, layers=(1, -1), layer_mix="mean")
    concat = LLMTextEncoder(path, layers=(1, -1), layer_mix="concat")
    assert mean.hidden_size == HIDDEN and concat.hidden_size == 2 * HIDDEN
    torch.testing.assert_close(mean(**tokens)[0], (first + last) / 2)
    torch.testing.assert_close(concat(**tokens)[0], torch.cat([first, last], dim=-1))


def test_bad_layer_index_is_rejected(llm_paths: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        LLMTextEncoder(str(llm_paths["llama"]), layers=(LAYERS + 1,))


def _bos_count(tokenizer: PromptTokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return [int(((row == tokenizer.bos_id) & m.bool()).sum()) for row, m in zip(ids, mask)]


def _tokenizer_adds_nothing(path: str) -> bool:
    raw = PromptTokenizer(path, bos="none").tokenizer
    return raw("a")["input_ids"] == raw("a", add_special_tokens=False)["input_ids"]


def test_bos_exactly_once_when_tokenizer_adds_it(llm_paths: dict[str, Path]) -> None:
    tokenizer = PromptTokenizer(str(llm_paths["llama"]))
    tokens = tokenizer(PROMPTS)
    assert (tokens["input_ids"][:, 0] == tokenizer.bos_id).all()
    assert _bos_count(tokenizer, tokens["input_ids"], tokens["attention_mask"]) == [1, 1]


def test_bos_prepended_when_tokenizer_does_not_add_it(llm_paths: dict[str, Path]) -> None:
    path = str(llm_paths["llama_no_auto_bos"])
    assert _tokenizer_adds_nothing(path)
    tokenizer = PromptTokenizer(path)
    tokens = tokenizer(PROMPTS)
    assert (tokens["input_ids"][:, 0] == tokenizer.bos_id).all()
    assert _bos_count(tokenizer, tokens["input_ids"], tokens["attention_mask"]) == [1, 1]
    # Same ids as the tokenizer that adds BOS itself.
    assert torch.equal(tokens["input_ids"], PromptTokenizer(str(llm_paths["llama"]))(PROMPTS)["input_ids"])


def test_bos_none_gives_no_bos(llm_paths: dict[str, Path]) -> None:
    bos = PromptTokenizer(str(llm_paths["llama"])).bos_id
    for kind in ("llama", "qwen2"):
        tokenizer = PromptTokenizer(str(llm_paths[kind]), bos="none")
        assert tokenizer.bos_id is None
        tokens = tokenizer(PROMPTS)
        assert [int(((row == bos) & m.bool()).sum()) for row, m in zip(tokens["input_ids"], tokens["attention_mask"])] == [0, 0]


def test_qwen2_tokenizer_without_bos_gets_the_configs(llm_paths: dict[str, Path]) -> None:
    """Qwen2.5's tokenizer has no BOS, its config names <|endoftext|>: auto puts that first,
    and the empty prompt is exactly that one token (issue 14.3)."""
    tokenizer = PromptTokenizer(str(llm_paths["qwen2"]))
    raw = tokenizer.tokenizer
    assert raw.bos_token_id is None
    assert tokenizer.bos_id == raw.convert_tokens_to_ids("<|endoftext|>") and tokenizer.bos_source == "config"
    plain = raw("a red cube", add_special_tokens=False)["input_ids"]
    assert tokenizer(["a red cube"])["input_ids"][0].tolist() == [tokenizer.bos_id, *plain]
    empty = tokenizer([""])
    assert empty["input_ids"].tolist() == [[tokenizer.bos_id]] and empty["attention_mask"].tolist() == [[1]]
    assert PromptTokenizer(str(llm_paths["qwen2"]), max_length=4)(["abcdefgh"])["input_ids"].shape == (1, 4)


def test_bos_setting_maps_the_former_add_bos() -> None:
    from linguadiff.models.text_encoder import bos_setting

    assert bos_setting({"add_bos": True}) == "auto" and bos_setting({"add_bos": False}) == "none"
    assert bos_setting({"bos": "none"}) == "none" and bos_setting({}) == "auto"
    assert bos_setting({"bos": "auto", "add_bos": False}) == "none"  # an old run config merged over today's defaults
    with pytest.raises(ValueError, match="llm.bos"):
        bos_setting({"bos": "yes"})


@pytest.mark.parametrize("kind", ("qwen2_no_config_bos", "t5"))
def test_models_without_bos_get_none(llm_paths: dict[str, Path], kind: str) -> None:
    tokenizer = PromptTokenizer(str(llm_paths[kind]))
    assert tokenizer.bos_id is None
    plain = tokenizer.tokenizer("a red cube", add_special_tokens=False)["input_ids"]
    ids = tokenizer(["a red cube"])["input_ids"][0].tolist()
    assert ids[: len(plain)] == plain
    if kind == "t5":  # T5's own trailing </s> is kept
        assert ids == plain + [tokenizer.tokenizer.eos_token_id]


def test_missing_pad_token_uses_eos_without_changing_vocab(llm_paths: dict[str, Path]) -> None:
    tokenizer = PromptTokenizer(str(llm_paths["llama"]))
    assert tokenizer.tokenizer.pad_token is None
    assert tokenizer.pad_id == tokenizer.tokenizer.eos_token_id
    assert len(tokenizer.tokenizer) == 259


def test_empty_prompt_keeps_one_real_token(llm_paths: dict[str, Path]) -> None:
    tokens = PromptTokenizer(str(llm_paths["qwen2"]), bos="none")(["", ""])
    assert tokens["input_ids"].shape == (2, 1) and tokens["attention_mask"].all()


def test_truncation_and_length_clamp(llm_paths: dict[str, Path]) -> None:
    # The tiny Llama has 128 positions, its tokenizer 512: the smaller limit wins.
    assert PromptTokenizer(str(llm_paths["llama"]), max_length=10_000).max_length == 128
    # T5 has no position limit: the tokenizer's 512 applies.
    assert PromptTokenizer(str(llm_paths["t5"]), max_length=10_000).max_length == 512
    for kind in ("llama", "llama_no_auto_bos", "t5"):
        tokenizer = PromptTokenizer(str(llm_paths[kind]), max_length=8)
        ids = tokenizer(["x" * 50, "y"])["input_ids"]
        assert ids.shape == (2, 8)
    assert ids[0, -1] == tokenizer.tokenizer.eos_token_id  # T5 truncates before its </s>


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_real_tokens(encoders: dict[str, LLMTextEncoder], kind: str) -> None:
    encoder = encoders[kind]
    alone, alone_mask = encoder.encode(PROMPTS[:1])
    batched, batched_mask = encoder.encode(PROMPTS)
    n = alone.shape[1]
    assert batched.shape[1] > n and alone_mask.all()
    assert not batched_mask[0, n:].any()
    torch.testing.assert_close(batched[0, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_tokenizer_is_picklable(llm_paths: dict[str, Path]) -> None:
    tokenizer = PromptTokenizer(str(llm_paths["llama"]))
    clone = pickle.loads(pickle.dumps(tokenizer))
    for key, value in tokenizer(PROMPTS).items():
        assert torch.equal(clone(PROMPTS)[key], value)


def test_frozen_and_stays_in_eval(encoders: dict[str, LLMTextEncoder]) -> None:
    encoder = encoders["t5"]
    assert is_frozen(encoder) and is_frozen(encoder.model)
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = nn.ModuleDict({"text_encoder": encoder, "head": nn.Linear(2, 2)})
    parent.train()  # what Lightning does at the start of fit
    assert parent["head"].training
    assert not any(m.training for m in encoder.modules())
    encoder.model.train(True)
    assert not encoder.model.training
    features, _ = encoder.encode(PROMPTS)
    assert not features.requires_grad


def test_freeze_survives_pickle_and_deepcopy() -> None:
    module = freeze(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        clone.train()
        assert is_frozen(clone) and not clone.training and not clone[1].training
        assert not any(p.requires_grad for p in clone.parameters())
        assert clone.train.args[0] is clone  # bound to the copy, not to the original


def test_loads_in_bfloat16_and_returns_float32(llm_paths: dict[str, Path]) -> None:
    encoder = LLMTextEncoder(str(llm_paths["qwen2"]), dtype="bfloat16")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    features, _ = encoder.encode(PROMPTS)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_frozen_module_stays_in_eval_through_lightning_fit() -> None:
    class Stage(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = freeze(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
            self.head = nn.Linear(4, 1)
            self.modes: list[tuple[bool, bool]] = []

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.modes.append((self.frozen.training or self.frozen[1].training, self.head.training))
            return self.head(self.frozen(batch[0])).mean()

        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            self.head(self.frozen(batch[0]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    stage = Stage()
    trainer = L.Trainer(max_steps=3, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(stage, loader, loader)
    assert stage.modes == [(False, True)] * 3


def test_prompt_tokenizer_from_a_tokenizer_only_folder(tmp_path):
    """A folder holding a tokenizer but no model config (transformers 5 raises ValueError there)."""
    from linguadiff.offline_tokenizers import save_byte_tokenizer

    save_byte_tokenizer(tmp_path, model_max_length=1024)
    tokenizer = PromptTokenizer(str(tmp_path), max_length=8)
    ids = tokenizer(["a red circle", "x"])["input_ids"]
    assert ids.shape == (2, 8) and ids[0, 0].item() == tokenizer.bos_id


def test_baichuan2_is_refused_before_its_remote_code_runs(tmp_path: Path, capsys) -> None:
    """Issue 14.5: Baichuan2's remote code does not load with transformers 5; the preset stops
    at start with a plain message naming what to use instead, and none of its code runs."""
    import json

    import train
    from linguadiff.config import ConfigError

    folder = tmp_path / "Baichuan2-7B-Chat"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_baichuan.py").write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "baichuan", "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig"}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="llm=qwen2.5-7b"):
        LLMTextEncoder(str(folder), trust_remote_code=True)
    with pytest.raises(ConfigError, match="Baichuan2"):
        PromptTokenizer(str(folder), trust_remote_code=True)
    assert train.main(["llm=baichuan2-7b", f"llm.path={folder}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "does not load with transformers" in err and "llm=qwen2.5-7b" in err
    assert not marker.exists()
