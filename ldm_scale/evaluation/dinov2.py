"""DINOv2 ViT image features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics", dgm-eval): the Fréchet distance on the CLS token of DINOv2 ViT-L/14.

The protocol is dgm-eval's, so numbers are comparable with its published ones: the image is resized
to 224 x 224 with PIL's bicubic filter (``resize=pil_bicubic``), scaled to [0, 1], normalised with the
ImageNet mean/std, and the feature is the final-LayerNorm CLS token (the hub model's output,
``x_norm_clstoken``; 1024-d for ViT-L/14).

The network is timm's ``vit_*_patch14_dinov2`` (a maintained implementation of the same ViT), built
at 224 px; the weights are Meta's published ``dinov2_<arch>_pretrain.pth`` (the files
``torch.hub.load("facebookresearch/dinov2", ...)`` caches, found in the same hub cache). Loading
resamples the 37 x 37 position embedding of the 518-px pretraining to 16 x 16 by the rule the DINOv2
hub model applies at every forward pass (bicubic, no antialias, scale factor (16 + 0.1) / 37: its
"interpolate_offset"), not timm's own resampling (antialiased, by output size), which gives
slightly different features. ``benchmarks/check_dinov2_reference.py`` compares the result with
Meta's code itself; ``tests/unit/test_eval_dinov2.py`` with Hugging Face's independent port.

Meta publishes no digest for these files; ``extractor.sha256`` pins one when given, and the digest
of the file used is recorded with every result (``weights.py``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm_scale.evaluation import weights

INPUT_SIZE = 224  # dgm-eval's
PATCH = 14
PRETRAIN_GRID = 37  # 518 px / 14
POS_EMBED_OFFSET = 0.1  # the DINOv2 hub model's interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

# arch -> (timm model name, feature width)
ARCHS: Dict[str, tuple] = {
    "vits14": ("vit_small_patch14_dinov2", 384),
    "vitb14": ("vit_base_patch14_dinov2", 768),
    "vitl14": ("vit_large_patch14_dinov2", 1024),  # dgm-eval's default
    "vitg14": ("vit_giant_patch14_dinov2", 1536),
}


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown DINOv2 architecture {arch!r}; choose one of {sorted(ARCHS)} (dinov2:vitl14 is "
                         "dgm-eval's FD-DINOv2)")


def weights_file(arch: str) -> weights.WeightsFile:
    check_arch(arch)
    name = f"dinov2_{arch}_pretrain.pth"
    return weights.WeightsFile(
        label=f"DINOv2 {arch} weights", filename=name, url=f"{BASE_URL}/dinov2_{arch}/{name}",
        offline_hint=f"Offline, extractor.name=dinov2:{arch}@random runs without weights but its numbers are not "
                     "comparable with published FD-DINOv2.")


def build_network(arch: str) -> nn.Module:
    """The ViT at 224 px with no classifier: ``forward`` returns the final-LayerNorm CLS token."""
    import timm  # lazy: only DINOv2 users need it

    check_arch(arch)
    net = timm.create_model(ARCHS[arch][0], pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    if getattr(net, "global_pool", "token") != "token":
        raise RuntimeError(f"timm's {ARCHS[arch][0]} pools {net.global_pool!r}, not the CLS token DINOv2 features are")
    return net


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + M*M, D] -> [1, 1 + grid*grid, D], as the DINOv2 hub model interpolates at forward time."""
    n = pos_embed.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if m == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    scale = (grid + POS_EMBED_OFFSET) / m
    patches = F.interpolate(patches.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise RuntimeError(f"resampled position grid is {tuple(patches.shape[-2:])}, expected {grid} x {grid}")
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def to_timm_state(state: Dict[str, torch.Tensor], grid: int = INPUT_SIZE // PATCH) -> Dict[str, torch.Tensor]:
    """Meta's checkpoint layout -> timm's at ``grid`` x ``grid`` patches. The names agree but for the
    giant's SwiGLU (``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``); the masked-modelling token is
    training-only."""
    if "register_tokens" in state:
        raise ValueError("DINOv2 checkpoints with registers (dinov2_*_reg4) are not supported; use the plain "
                         "dinov2_<arch>_pretrain.pth (what dgm-eval uses)")
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "pos_embed":
            value = resample_pos_embed(value, grid)
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


def load_dinov2(arch: str, weights_path: Optional[str] = None, *, sha256: Optional[str] = None,
                allow_download: bool = True) -> tuple:
    """(network with Meta's weights, the file's SHA-256), in eval mode without gradients."""
    spec = weights_file(arch)
    path = weights.resolve(spec, weights_path, allow_download=allow_download)
    digest = weights.verify(spec, path, sha256, source=weights.source_of(spec, weights_path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(arch)
    missing, unexpected = net.load_state_dict(to_timm_state(state), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path} is not a DINOv2 {arch} state dict: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return net.eval().requires_grad_(False), digest


def random_dinov2(arch: str, seed: int = 0) -> nn.Module:
    """The architecture with timm's initialisation under ``seed``: needs nothing on disk; its
    features are NOT comparable with any published FD-DINOv2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(arch)
    return net.eval().requires_grad_(False)
