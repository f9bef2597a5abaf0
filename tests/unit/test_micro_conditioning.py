"""SDXL's micro-conditioning (models/micro_conditioning.py): equal to diffusers' SDXL embedding path
(``add_time_proj`` + ``add_embedding``) with the same weights; a fresh embedding leaves the UNet and
the DiT unchanged; once trained, the prediction depends on the size and crop; strict arguments."""
from __future__ import annotations

import pytest
import torch

from ldm_scale.models.dit import DiT, DiTConfig
from ldm_scale.models.micro_conditioning import MicroConditioning, batch_micro, sampling_micro
from ldm_scale.models.unet import UNetConfig, UNetModel

MICRO = torch.tensor([[512.0, 768.0, 0.0, 32.0, 448.0, 576.0], [1024.0, 1024.0, 12.0, 0.0, 512.0, 512.0]])


def _unet(micro: bool) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(UNetConfig(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_heads=4,
                                context_dim=16, micro_conditioning=micro)).eval()


def _dit(micro: bool) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, text="cross",
                         context_dim=16, micro_conditioning=micro)).eval()


def test_embedding_equals_diffusers_sdxl_add_embedding():
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    torch.manual_seed(1)
    ours = MicroConditioning(64)
    torch.nn.init.normal_(ours.linear_2.weight, std=0.02)  # not the zero start, or both sides are 0
    # SDXL's unet config: addition_time_embed_dim=256, flip_sin_to_cos=True, freq_shift=0
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    theirs = TimestepEmbedding(6 * 256, 64)
    theirs.load_state_dict(ours.state_dict())
    expected = theirs(proj(MICRO.flatten()).reshape(2, -1))
    torch.testing.assert_close(ours(MICRO), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [_unet, _dit], ids=["unet", "dit"])
def test_a_fresh_embedding_changes_nothing_and_a_trained_one_sees_size_and_crop(build):
    plain, conditioned = build(False), build(True)
    with torch.no_grad():  # a "trained" network: both start by predicting 0 (zero output layers)
        for name, p in conditioned.named_parameters():
            if "micro_embed.linear_2" not in name:
                p.normal_(std=0.05)
    # the same weights apart from the embedding (strict: nothing else differs)
    plain.load_state_dict({k: v for k, v in conditioned.state_dict().items() if "micro_embed" not in k})
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    with torch.no_grad():
        assert torch.equal(conditioned(x, t, context=context, micro=MICRO), plain(x, t, context=context))
        torch.nn.init.normal_(conditioned.micro_embed.linear_2.weight, std=0.5)
        a = conditioned(x, t, context=context, micro=MICRO)
        b = conditioned(x, t, context=context, micro=MICRO.flip(0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("build", [_unet, _dit], ids=["unet", "dit"])
def test_micro_is_passed_exactly_when_the_model_has_it(build):
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="micro_conditioning"):
        build(False)(x, t, context=context, micro=MICRO)
    with pytest.raises(ValueError, match="micro_conditioning"):
        build(True)(x, t, context=context)


def test_batch_and_sampling_values():
    batch = {"original_size": torch.tensor([[512, 768]]), "crop_top_left": torch.tensor([[0, 32]]),
             "target_size": torch.tensor([[448, 576]])}
    assert batch_micro(batch, torch.device("cpu")).tolist() == [MICRO[0].tolist()]
    assert sampling_micro(2, 48, 16, torch.device("cpu")).tolist() == [[48, 16, 0, 0, 48, 16]] * 2
    with pytest.raises(ValueError, match="data.buckets.enabled=true"):
        batch_micro({"image": torch.zeros(1)}, torch.device("cpu"))


def test_dit_initialisation_zeroes_the_embedding_output_again():
    model = _dit(True)
    torch.nn.init.normal_(model.micro_embed.linear_2.weight)
    model.initialize_weights()  # what ZeRO-3 runs on the gathered shards
    assert not model.micro_embed.linear_2.weight.any() and not model.micro_embed.linear_2.bias.any()
    assert model.micro_embed.linear_1.weight.std() > 0
