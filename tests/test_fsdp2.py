"""FSDP2 (`fully_shard`) applied to a stage module's units, in one process (a gloo group of one
rank): which units are sharded, replicated, resharded after forward, recomputed; bf16 compute
over fp32 shards; full weights gathered for export. The 2-rank run that trains, saves,
resumes and exports is tests/test_scale_out.py::test_fsdp_on_cpu_trains_saves_sharded_trained_weights_and_resumes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from linguadiff.config import ConfigError
from linguadiff.strategy import apply_fully_shard, check_units, fsdp2_mesh, fsdp_units, gathered_fsdp2, reshard


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


class FrozenLLM(nn.Module):
    """Stands for an LLM: its block class is listed in `_no_split_modules`, as Hugging Face's are."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_encoder = FrozenLLM().to(torch.bfloat16).requires_grad_(False)
        self.adapter = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 8))


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _reshards_after_forward(module: nn.Module) -> bool:
    from torch.distributed.fsdp import fully_shard

    return fully_shard.state(module)._fsdp_param_group.post_forward_mesh_info is not None


@pytest.mark.parametrize(("sharding", "frozen"), [("FULL_SHARD", "shard"), ("SHARD_GRAD_OP", "replicate")])
def test_fully_shard_units_modes_precision_and_gathering(one_rank, sharding, frozen):
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    stage = Stage()
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    units = fsdp_units(stage)
    check_units(stage, units)
    counts = apply_fully_shard(stage, units, fsdp2_mesh("cpu", 1, 1, sharding), precision="bf16-mixed",
                               sharding=sharding, frozen=frozen)
    assert {n for n, _ in stage.named_parameters()} == set(before)  # weight names (checkpoint keys) unchanged
    block, head, llm_block = stage.adapter[0], stage.adapter, stage.text_encoder.layers[0]
    assert isinstance(block, FSDPModule) and isinstance(head, FSDPModule)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in stage.adapter.parameters())  # fp32 master
    assert "checkpoint" in _get_registry(block) and "checkpoint" not in (_get_registry(llm_block) or {})
    assert _reshards_after_forward(block) == (sharding == "FULL_SHARD")  # SHARD_GRAD_OP keeps it gathered
    if frozen == "shard":
        assert counts["replicated"] == 0 and isinstance(llm_block, FSDPModule) and _reshards_after_forward(llm_block)
        assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in stage.text_encoder.parameters())
    else:  # whole, bf16, on every rank: no unit, no gathers
        assert counts["replicated"] == 3 and not any(isinstance(m, FSDPModule) for m in stage.text_encoder.modules())
        assert all(not isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in stage.text_encoder.parameters())

    with torch.no_grad():
        hidden = stage.text_encoder(torch.randn(2, 3, 4, dtype=torch.bfloat16))
    out = stage.adapter(hidden.float())
    assert out.dtype == torch.bfloat16  # computed in bf16
    out.float().pow(2).mean().backward()
    assert all(isinstance(p.grad, DTensor) and p.grad.dtype == torch.float32 for p in stage.adapter.parameters())
    assert all(p.grad is None for p in stage.text_encoder.parameters())
    torch.nn.utils.clip_grad_norm_(list(stage.adapter.parameters()), 1e-3)  # the clipping FSDP2 runs uses

    # Export's gathering: full fp32 weights, the models' own classes, then back to shards.
    with torch.no_grad(), gathered_fsdp2([stage.adapter]):
        assert type(stage.adapter) is nn.Sequential
        full = dict(stage.adapter.named_parameters())
        assert all(not isinstance(p, DTensor) and p.dtype == torch.float32 for p in full.values())
        assert all(torch.equal(p, before[f"adapter.{n}"]) for n, p in full.items())
    assert isinstance(stage.adapter, FSDPModule) and isinstance(stage.adapter[1].weight, DTensor)
    reshard(stage)


def test_fsdp2_meshes_and_bad_modes(one_rank):
    assert fsdp2_mesh("cpu", 1, 1, "FULL_SHARD").mesh_dim_names == ("shard",)
    assert fsdp2_mesh("cpu", 1, 1, "HYBRID_SHARD").mesh_dim_names == ("replicate", "shard")
    with pytest.raises(ConfigError, match="as many ranks on every node"):
        fsdp2_mesh("cpu", 3, 2, "HYBRID_SHARD")
    stage = Stage()
    with pytest.raises(ConfigError, match="fsdp.frozen"):
        apply_fully_shard(stage, fsdp_units(stage), fsdp2_mesh("cpu", 1, 1, "FULL_SHARD"), precision="32-true",
                          frozen="offload")


@pytest.mark.parametrize("sharding", ["FULL_SHARD", "HYBRID_SHARD"])
def test_fused_adamw_and_clipping_step_the_shards_as_they_step_whole_weights(one_rank, sharding):
    """What the GPU path does with FSDP2 (lightning_modules/base.py: fused AdamW on CUDA, whose
    weights are DTensors there; clip_grad_norm over DTensor gradients), on a 1-D and a 2-D
    mesh: three steps change the shards exactly as they change the same weights unsharded."""
    from torch.distributed.tensor import DTensor

    from linguadiff.strategy import clip_grad_norm

    torch.manual_seed(0)
    stage, sharded = Stage(), Stage()
    sharded.load_state_dict(stage.state_dict())
    apply_fully_shard(sharded, fsdp_units(sharded), fsdp2_mesh("cpu", 1, 1, sharding), precision="32-true")
    x = torch.randn(2, 3, 8)
    stepped = {}
    for name, model in (("whole", stage), ("sharded", sharded)):
        model.adapter.eval()  # no dropout: the same computation in both
        optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2, fused=True)
        for _ in range(3):
            model.adapter(x).square().mean().backward()
            clip_grad_norm(None, optimizer, 0.05)  # (any strategy but FSDP1's: torch's own clipping)
            optimizer.step()
            optimizer.zero_grad()
        stepped[name] = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.adapter.state_dict().items()}
    assert any(isinstance(p, DTensor) for p in sharded.adapter.parameters())
    assert not any(torch.equal(v, Stage().adapter.state_dict()[k]) for k, v in stepped["whole"].items())
    differ = [k for k, v in stepped["whole"].items() if not torch.equal(v, stepped["sharded"][k])]
    assert not differ, differ
