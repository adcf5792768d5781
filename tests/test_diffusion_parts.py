"""The stage-2/3 building blocks: EMA, the diffusion loss options, SDXL time ids."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from linguadiff.models.diffusion import DiffusionLossConfig, diffusion_loss, sdxl_time_ids
from lightning_modules.ema import EMA


def _sgd_on(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, delta: float) -> None:
    """One optimizer step that adds `delta` to every trained weight, with the EMA around it."""
    initial = ema.before_step(optimizer)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, -delta)
    optimizer.step()
    ema.after_step(optimizer, initial)


def test_ema_averages_trained_weights_and_restores_them():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen parts are not averaged
    optimizer = _sgd_on(model)
    ema = EMA(decay=0.5)
    start = model[0].weight.detach().clone()
    _step(model, optimizer, ema, 1.0)  # first update: warm-up decay min(0.5, 2/11) = 2/11
    expected = start + (1 - 2 / 11) * 1.0
    shadows = dict((id(p), s) for p, s in ema.shadows(optimizer))
    assert torch.allclose(shadows[id(model[0].weight)], expected)
    assert len(shadows) == 2 and id(model[1].weight) not in shadows
    trained = model[0].weight.detach().clone()
    with ema.applied(optimizer):
        assert torch.allclose(model[0].weight, expected)
    assert torch.equal(model[0].weight, trained)  # put back after sampling / export

    # The averages are optimizer state: saved and restored with it, the counters beside it.
    restored_model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    restored_model.load_state_dict(model.state_dict())
    restored_model[1].requires_grad_(False)
    restored_opt, restored = _sgd_on(restored_model), EMA(decay=0.5)
    restored_opt.load_state_dict(optimizer.state_dict())
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    assert torch.equal(ema.shadows(restored_opt)[0][1], ema.shadows(optimizer)[0][1])
    _step(model, optimizer, ema, 1.0)
    _step(restored_model, restored_opt, restored, 1.0)
    assert torch.equal(ema.shadows(optimizer)[0][1], restored.shadows(restored_opt)[0][1])


def test_ema_update_every_and_bad_decay():
    model = nn.Linear(2, 2)
    optimizer, ema = _sgd_on(model), EMA(decay=0.9, update_every=3)
    for _ in range(7):
        _step(model, optimizer, ema, 0.1)
    assert ema.steps == 7 and ema.updates == 2
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(decay=1.0)
    with ema.applied(None):  # no optimizer yet (sampling before training): the weights as they are
        pass


def test_sdxl_time_ids_order():
    ids = sdxl_time_ids(torch.tensor([[768, 1024]]), torch.tensor([[10, 20]]), torch.tensor([[1024, 1024]]))
    assert ids.tolist() == [[768.0, 1024.0, 10.0, 20.0, 1024.0, 1024.0]]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_targets_and_options(unet, prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    x0, context = torch.randn(4, 3, 8, 8), torch.randn(4, 5, 8)
    t = torch.tensor([10, 200, 600, 990])

    def loss(options, seed=0):
        return diffusion_loss(unet, scheduler, x0, context, options, timesteps=t, generator=torch.Generator().manual_seed(seed))

    plain = loss(DiffusionLossConfig())
    assert plain.shape == (4,) and torch.equal(plain, loss(DiffusionLossConfig()))  # fixed noise: repeatable
    # Min-SNR-gamma: weight min(SNR, 5) / SNR for epsilon, / (SNR + 1) for v-prediction.
    weighted = loss(DiffusionLossConfig(min_snr_gamma=5.0))
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    expected = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(weighted / plain, expected.float(), rtol=1e-4)
    assert expected[0] < 0.02  # the low-noise timestep t=10 counts far less
    # Input perturbation and noise offset change what the UNet sees.
    assert not torch.allclose(loss(DiffusionLossConfig(input_perturbation=0.1)), plain)
    assert not torch.allclose(loss(DiffusionLossConfig(noise_offset=0.1)), plain)
