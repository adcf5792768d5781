"""QueryAdapter: shapes, padding invariance, gradients, safetensors export round trip, paper size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from linguadiff.models.adapter import QueryAdapter, read_adapter_metadata

LLM_DIM, DIM, QUERIES, POOLED = 24, 32, 7, 20


def make_adapter(pooled_dim: int | None = POOLED, seed: int = 0) -> QueryAdapter:
    torch.manual_seed(seed)
    return QueryAdapter(LLM_DIM, DIM, QUERIES, encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=64,
                        pooled_dim=pooled_dim)


def lengths_to_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


@pytest.mark.parametrize("pooled_dim", [None, POOLED])
def test_shapes(pooled_dim: int | None) -> None:
    adapter = make_adapter(pooled_dim)
    out = adapter(torch.randn(3, 11, LLM_DIM), lengths_to_mask([11, 4, 1], 11))
    assert out["context"].shape == (3, QUERIES, DIM)
    if pooled_dim is None:
        assert out["pooled"] is None
    else:
        assert out["pooled"].shape == (3, POOLED)


@pytest.mark.parametrize("training", [False, True])
def test_padding_invariance(training: bool) -> None:
    adapter = make_adapter().train(training)
    torch.manual_seed(1)
    prompt = torch.randn(1, 5, LLM_DIM)
    other = torch.randn(1, 9, LLM_DIM)
    # Padded positions get large garbage: a leak through the mask would show.
    padded = torch.cat([torch.cat([prompt, 100 * torch.randn(1, 4, LLM_DIM)], dim=1), other])
    with torch.set_grad_enabled(training):
        alone = adapter(prompt, torch.ones(1, 5, dtype=torch.bool))
        batched = adapter(padded, lengths_to_mask([5, 9], 9))
    torch.testing.assert_close(batched["context"][:1], alone["context"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched["pooled"][:1], alone["pooled"], atol=1e-5, rtol=1e-5)


def test_fully_masked_row_stays_finite() -> None:
    adapter = make_adapter().eval()
    mask = lengths_to_mask([3, 0], 3)
    out = adapter(torch.randn(2, 3, LLM_DIM), mask)
    assert torch.isfinite(out["context"]).all() and torch.isfinite(out["pooled"]).all()
    assert not mask[1].any()  # the caller's mask is left alone


def test_every_parameter_gets_a_gradient() -> None:
    adapter = make_adapter()
    out = adapter(torch.randn(2, 6, LLM_DIM), lengths_to_mask([6, 2], 6))
    (out["context"].square().mean() + out["pooled"].square().mean()).backward()
    missing = [name for name, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_save_load_round_trip(tmp_path: Path) -> None:
    adapter = make_adapter().eval()
    metadata = {"llm": "Qwen/Qwen2.5-7B", "llm_layers": [-1], "stage": 1, "learning_rate": 1e-4}
    path = adapter.save(tmp_path / "export" / "adapter.safetensors", metadata)
    loaded, loaded_metadata = QueryAdapter.from_file(path)
    assert loaded_metadata == metadata
    assert loaded.config == adapter.config
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    features, mask = torch.randn(2, 5, LLM_DIM), lengths_to_mask([5, 3], 5)
    loaded.eval()
    for key in ("context", "pooled"):
        torch.testing.assert_close(loaded(features, mask)[key], adapter(features, mask)[key], atol=0, rtol=0)
    assert read_adapter_metadata(path) == {"adapter_config": adapter.config, **metadata}
    assert not list(path.parent.glob("*.tmp"))


def test_reserved_metadata_keys_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_adapter().save(tmp_path / "a.safetensors", {"format": "mine"})


def test_not_an_adapter_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        QueryAdapter.from_file(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="foreign.safetensors is not a LinguaDiff adapter"):
        QueryAdapter.from_file(foreign)


def test_mismatched_keys_are_a_clear_error(tmp_path: Path) -> None:
    path = make_adapter(pooled_dim=None).save(tmp_path / "adapter.safetensors")
    header = read_adapter_metadata(path)
    # Same tensors, but metadata claiming a pooled head the file lacks.
    state = {name: t.contiguous() for name, t in make_adapter(pooled_dim=None).state_dict().items()}
    config = {**header["adapter_config"], "pooled_dim": POOLED}
    lying = tmp_path / "lying.safetensors"
    save_file(state, str(lying), metadata={"format": "linguadiff-adapter", "adapter_config": json.dumps(config)})
    with pytest.raises(ValueError, match=r"(?s)lying\.safetensors.*pooled_head"):
        QueryAdapter.from_file(lying)


def test_paper_size_parameter_count() -> None:
    # OmniDiffusion's SDXL adapter: 4096 -> 2048, 4 + 4 layers, 8 heads, ffn 8192, 227 queries: ~487M.
    with torch.device("meta"):
        adapter = QueryAdapter(4096, 2048, 227, encoder_layers=4, decoder_layers=4, heads=8, ffn_dim=8192)
    count = sum(p.numel() for p in adapter.parameters())
    assert abs(count - 487e6) / 487e6 < 0.01, count
    assert all(p.is_meta for p in adapter.parameters())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": 1_000_000, "ffn_dim": 4_000_000}, "do not match"),  # a header claiming a ~100 TB adapter
        ({"heads": 5}, "does not describe a valid adapter"),  # 5 heads cannot split width 32
        ({"dim": "32"}, "positive integers"),
        ({"encoder_layers": -1}, "positive integers"),
    ],
)
def test_a_hostile_adapter_header_allocates_nothing(tmp_path: Path, change: dict, message: str) -> None:
    """Sizes in a file's metadata are checked against the tensors the file really holds (on the
    meta device) before anything is built: a lying header is an error, never an allocation."""
    state = {name: t.contiguous() for name, t in make_adapter().state_dict().items()}
    config = {**make_adapter().config, **change}
    path = tmp_path / "hostile.safetensors"
    save_file(state, str(path), metadata={"format": "linguadiff-adapter", "adapter_config": json.dumps(config)})
    with pytest.raises(ValueError, match=message):
        QueryAdapter.from_file(path)
