"""Every scaled_dot_product_attention call of every flavour gets q, k, v with a contiguous last
dimension (stride 1): the flash and memory-efficient kernels refuse anything else and PyTorch then
silently runs the slow math kernel. Checked on the meta device, so the 1.45B flavour costs nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_scale.models.conditioners import build_conditioner
from ldm_scale.models.registry import AUTOENCODERS, FLAVOURS, build_autoencoder
from ldm_scale.models.unet import UNetModel


@pytest.fixture
def sdpa_strides(monkeypatch):
    seen = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(tuple(t.stride() for t in (q, k, v)))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def assert_last_dim_contiguous(seen, what):
    assert seen, f"{what}: no attention call was made"
    for strides in seen:
        assert all(s[-1] == 1 for s in strides), f"{what}: SDPA got strides {strides}"


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_unet_and_text_encoder_attention_inputs(flavour, sdpa_strides):
    spec = FLAVOURS[flavour]
    with torch.device("meta"):
        unet = UNetModel(spec.unet)
        h = 64
        x = torch.empty(2, spec.unet.in_channels, h, h)
        t = torch.zeros(2, dtype=torch.long)
        kwargs = {}
        if spec.unet.use_spatial_transformer:
            kwargs["context"] = torch.empty(2, 7, spec.unet.context_dim)
        if spec.unet.num_classes is not None:
            kwargs["y"] = torch.zeros(2, dtype=torch.long)
        if spec.unet.attention_resolutions:
            unet(x, t, **kwargs)
            assert_last_dim_contiguous(sdpa_strides, f"{flavour} UNet")
        if spec.cond_stage.kind == "text":  # our transformer; OpenCLIP brings its own attention
            sdpa_strides.clear()
            text = build_conditioner(spec.cond_stage)
            text.encode_tokens(torch.zeros(2, spec.cond_stage.text.max_length, dtype=torch.long))
            assert_last_dim_contiguous(sdpa_strides, f"{flavour} text encoder")


@pytest.mark.parametrize("name", sorted(AUTOENCODERS))
def test_autoencoder_attention_inputs(name, sdpa_strides):
    cfg = AUTOENCODERS[name]
    size = (cfg.kl if cfg.kind == "kl" else cfg.vq).ddconfig.resolution
    with torch.device("meta"):
        model = build_autoencoder(cfg)
        model(torch.empty(1, 3, size, size))  # encoder and decoder
    assert_last_dim_contiguous(sdpa_strides, f"{name} autoencoder")
