"""speed.float8: the UNet's and adapter's linear layers train in float8 (torchao) and the
export still holds plain weights that diffusers and our loaders read."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

pytest.importorskip("torchao.float8", reason="speed.float8 needs torchao: pip install -e '.[float8]'")

from lightning_modules.diffusion_stage import DiffusionStage  # noqa: E402
from lightning_modules.settings import DiffusionSettings, OptimSettings, StageSettings  # noqa: E402
from linguadiff.models.adapter import QueryAdapter  # noqa: E402
from linguadiff.models.diffusion import diffusion_loss, load_noise_scheduler, load_unet  # noqa: E402
from linguadiff.models.float8 import convertible  # noqa: E402
from linguadiff.models.prompt_encoder import PromptEncoder  # noqa: E402
from linguadiff.models.text_encoder import LLMTextEncoder  # noqa: E402
from tests.tiny_models import make_tiny_llm, make_tiny_sd_pipeline  # noqa: E402


def _float8_layers(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if type(m).__name__ == "Float8Linear"]


def test_float8_converts_trains_and_exports_plain_weights(tmp_path):
    llm = LLMTextEncoder(str(make_tiny_llm(tmp_path / "llm")))
    base = make_tiny_sd_pipeline(tmp_path / "sd15", kind="sd15")
    unet = load_unet(str(base))
    adapter = QueryAdapter(llm_dim=llm.hidden_size, dim=unet.config.cross_attention_dim, num_queries=16,
                           encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=40)  # 40: left in fp32
    # What the conversion should take: plain linear layers whose sides are multiples of 16.
    expected = {part: sorted(n for n, m in module.named_modules() if convertible(m))
                for part, module in (("unet", unet), ("adapter", adapter))}
    odd = [n for n, m in adapter.named_modules() if type(m) is nn.Linear and not convertible(m)]
    assert expected["unet"] and expected["adapter"] and odd  # the tiny models have both kinds

    settings = StageSettings(stage=2, trainable=("adapter", "unet"), optim=OptimSettings(lr=1e-3, total_steps=4),
                             float8=("unet", "adapter"))
    module = DiffusionStage(settings, DiffusionSettings(base_kind="sd15", ema_decay=0.5), PromptEncoder(llm, adapter),
                            unet, None, load_noise_scheduler(str(base)))
    assert sorted(_float8_layers(module.unet)) == expected["unet"]
    assert sorted(_float8_layers(module.adapter)) == expected["adapter"]
    assert all(type(module.adapter.get_submodule(n)) is nn.Linear for n in odd)  # left as they were

    optimizer = module.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    features, mask = llm.encode(["a red circle", "一个蓝色的正方形"])
    for _ in range(1):
        initial = module.ema.before_step(optimizer)
        context = module.prompt_encoder.from_features(features, mask)["context"]
        loss = diffusion_loss(module.unet, module.noise_scheduler, torch.randn(2, 4, 16, 16), context,
                              module.diffusion.loss).mean()
        loss.backward()
        assert torch.isfinite(loss)
        optimizer.step()
        optimizer.zero_grad()
        module.ema.after_step(optimizer, initial)
    moved = [n for n in expected["unet"] if not torch.equal(before[f"{n}.weight"], module.unet.state_dict()[f"{n}.weight"])]
    assert moved, "no float8 layer's weight was trained"

    export = tmp_path / "export"
    module.export(export, {"stage": 2})
    loaded = UNet2DConditionModel.from_pretrained(export / "unet")
    assert not _float8_layers(loaded)  # plain diffusers layers, plain tensors
    with module.ema_weights():
        ema = {k: v for k, v in module.unet.state_dict().items()}
        assert all(torch.equal(ema[k], v) for k, v in loaded.state_dict().items())
    adapter_back, _ = QueryAdapter.from_file(export / "adapter.safetensors")
    assert not _float8_layers(adapter_back)
