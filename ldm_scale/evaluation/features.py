"""Feature extractors behind one interface, identified by name in every result.

An extractor takes a batch of images (uint8 [B, 3, H, W], or float in [-1, 1] which is quantised
first, see ``preprocess``) and returns a dict of float32 feature tensors:

- ``pool``: the features FID, precision/recall and KID use (always present);
- ``logits``: class logits for the Inception Score (Inception only);
- ``spatial``: sFID features (Inception only);
- ``embedding``: the L2-comparable image embedding for the CLIP score (CLIP only).

Names (``get_extractor(name, ...)``):

- ``inception`` (alias ``inception-v3-fid``): the pinned FID Inception-v3 weights (see ``inception``);
  the only extractor whose FID is comparable with published numbers.
- ``random-inception`` (or ``random-inception-seed<S>``): the same architecture with seeded random
  weights; needs nothing on disk. Its results are labelled ``random-inception-seed<S> (NOT comparable
  to published FID)`` (with ``-<size>px`` when run at a smaller ``input_size``).
- ``clip:<arch>[@<pretrained>]``: an open_clip image tower (e.g. ``clip:ViT-B-32@openai``);
  without ``@pretrained`` the weights are random (seeded) and labelled so.
- ``dinov2:<arch>`` (``vits14``, ``vitb14``, ``vitl14``, ``vitg14``): Meta's DINOv2 ViT with its
  published weights, dgm-eval's protocol (``dinov2``); the Fréchet distance on ``dinov2:vitl14`` is
  FD-DINOv2. ``dinov2:<arch>@random`` (or ``@random-seed<S>``) has seeded random weights and is
  labelled NOT comparable.

``describe()`` records the extractor's name, its preprocessing, what its Fréchet distance is called
(``frechet_label``: FID, FD-DINOv2, FD-CLIP) and the SHA-256 of the weights file it loaded.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ldm_scale.evaluation import dinov2 as dino
from ldm_scale.evaluation import inception as inc
from ldm_scale.evaluation import weights as wfile
from ldm_scale.evaluation.preprocess import RESIZE_MODES, quantize_to_uint8, resize_for_extractor

NOT_COMPARABLE = "(NOT comparable to published FID)"
INCEPTION_NAMES = ("inception", "inception-v3-fid")


class FeatureExtractor(nn.Module):
    """Base: subclasses set ``name``, ``input_size``, ``feature_dims`` and implement ``_features``."""

    name: str = ""
    input_size: int = 0
    comparable_to_published: bool = False
    feature_dims: Dict[str, int] = {}
    frechet_label: str = "FD"  # what the Fréchet distance on ``pool`` is called in papers
    weights_sha256: Optional[str] = None  # of the file the weights came from (None: random or a library's)

    def __init__(self, resize: str = "pil_bicubic") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
        self.resize = resize

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> Dict[str, object]:
        """What a result file records about the extractor (name, resize rule, comparability)."""
        return {"name": self.name, "resize": self.resize, "input_size": self.input_size,
                "comparable_to_published": self.comparable_to_published,
                "feature_dims": dict(self.feature_dims), "frechet_label": self.frechet_label,
                "weights_sha256": self.weights_sha256}

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _features")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = quantize_to_uint8(images)
        # PIL resizes on the CPU; the bilinear rules run wherever the extractor lives.
        x = x.cpu() if self.resize.startswith("pil_") else x.to(self.device)
        out = self._features(resize_for_extractor(x, self.input_size, self.resize).to(self.device))
        return {k: v.float().cpu() for k, v in out.items()}


class InceptionExtractor(FeatureExtractor):
    frechet_label = "FID"

    def __init__(self, net: inc.FIDInceptionV3, name: str, comparable: bool, resize: str = "pil_bicubic",
                 input_size: int = inc.INPUT_SIZE, weights_sha256: Optional[str] = None):
        super().__init__(resize)
        self.net = net
        self.name = name
        self.comparable_to_published = comparable
        self.weights_sha256 = weights_sha256
        self.input_size = input_size
        self.feature_dims = {"pool": inc.POOL_DIM, "logits": inc.NUM_LOGITS,
                             "spatial": inc.SPATIAL_CHANNELS * inc.spatial_size(input_size) ** 2}

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.net(x)
        return {"pool": out["pool"], "logits": out["logits_unbiased"], "spatial": out["spatial"]}


class DINOv2Extractor(FeatureExtractor):
    """A DINOv2 ViT (``dinov2``): ``pool`` is the final-LayerNorm CLS token of the image resized to
    224 px and normalised with the ImageNet mean/std (dgm-eval's FD-DINOv2 protocol)."""

    frechet_label = "FD-DINOv2"

    def __init__(self, net: nn.Module, name: str, dim: int, comparable: bool, resize: str = "pil_bicubic",
                 weights_sha256: Optional[str] = None):
        super().__init__(resize)
        self.net = net
        self.name = name
        self.comparable_to_published = comparable
        self.weights_sha256 = weights_sha256
        self.input_size = dino.INPUT_SIZE
        self.feature_dims = {"pool": dim}
        self.register_buffer("mean", torch.tensor(dino.IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(dino.IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"pool": self.net((x.float() - self.mean) / self.std)}


class CLIPExtractor(FeatureExtractor):
    """An open_clip model: ``pool`` and ``embedding`` are the image embedding; ``encode_text`` embeds
    captions for the CLIP score. Images are resized by the same rule and normalised with the
    model's own mean/std (what its preprocessing transform does after the resize)."""

    frechet_label = "FD-CLIP"

    def __init__(self, model: nn.Module, tokenizer, name: str, comparable: bool, resize: str = "pil_bicubic"):
        super().__init__(resize)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.comparable_to_published = comparable
        size = model.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        with torch.no_grad():  # the embedding width differs between towers: measure it
            dim = int(model.encode_image(torch.zeros(1, 3, self.input_size, self.input_size)).shape[-1])
        self.feature_dims = {"pool": dim, "embedding": dim}

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        emb = self.model.encode_image((x - self.mean) / self.std)
        return {"pool": emb, "embedding": emb}

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()


def extractor_names() -> List[str]:
    return ["inception", "inception-v3-fid", "random-inception", "clip:<arch>[@<pretrained>]",
            "dinov2:<arch>[@random]"]


def get_extractor(name: str = "inception", *, device: Optional[torch.device | str] = None,
                  weights: Optional[str] = None, sha256: Optional[str] = None,
                  allow_download: bool = True, resize: str = "pil_bicubic", seed: int = 0,
                  input_size: Optional[int] = None) -> FeatureExtractor:
    """Build a feature extractor by name (see the module docstring), in eval mode on ``device``.

    ``weights``/``sha256``/``allow_download`` apply to published weights files (Inception, DINOv2;
    ``sha256=None``: the extractor's pinned digest, where one is published); ``seed`` to random weights.
    ``input_size`` (random Inception only) trades fidelity to the 299 px protocol for speed, e.g. in
    CPU smoke tests; it is part of the extractor's name.
    """
    device = torch.device(device or "cpu")
    if name in INCEPTION_NAMES:
        if input_size not in (None, inc.INPUT_SIZE):
            raise ValueError(f"the FID Inception is defined at {inc.INPUT_SIZE} px; input_size={input_size} "
                             "is only allowed for random-inception")
        sha256 = sha256 or inc.FID_WEIGHTS_SHA256
        net, digest = inc.load_fid_inception(weights, sha256=sha256, allow_download=allow_download)
        return InceptionExtractor(net, "inception-v3-fid", True, resize, weights_sha256=digest).to(device)
    if name == "random-inception" or name.startswith("random-inception-seed"):
        if name != "random-inception":
            seed = int(name[len("random-inception-seed"):])
        size = input_size or inc.INPUT_SIZE
        label = f"random-inception-seed{seed}" + (f"-{size}px" if size != inc.INPUT_SIZE else "")
        net = inc.random_fid_inception(seed)
        return InceptionExtractor(net, f"{label} {NOT_COMPARABLE}", False, resize, size).to(device)
    if name.startswith("clip:"):
        return _build_clip(name[len("clip:"):], device=device, resize=resize, seed=seed)
    if name.startswith("dinov2:"):
        arch, tag, seed = _parse_dinov2(name, seed)
        if tag:
            return DINOv2Extractor(dino.random_dinov2(arch, seed), f"dinov2:{arch}@random-seed{seed} {NOT_COMPARABLE}",
                                   dino.ARCHS[arch][1], False, resize).to(device)
        net, digest = dino.load_dinov2(arch, weights, sha256=sha256, allow_download=allow_download)
        return DINOv2Extractor(net, f"dinov2:{arch}", dino.ARCHS[arch][1], True, resize, digest).to(device)
    raise ValueError(f"unknown feature extractor {name!r}; known: {extractor_names()}")


def _parse_dinov2(name: str, seed: int) -> tuple:
    """``dinov2:<arch>[@random|@random-seed<S>]`` -> (arch, "random" or "", seed)."""
    arch, _, tag = name[len("dinov2:"):].partition("@")
    dino.check_arch(arch)
    if tag.startswith("random-seed") and tag[len("random-seed"):].isdigit():
        return arch, "random", int(tag[len("random-seed"):])
    if tag not in ("", "random"):
        raise ValueError(f"extractor {name!r}: after '@' only 'random' or 'random-seed<S>' (random weights, NOT "
                         f"comparable); dinov2:{arch} loads Meta's published weights")
    return arch, tag, seed


def _build_clip(spec: str, *, device: torch.device, resize: str, seed: int) -> CLIPExtractor:
    import open_clip  # lazy: only CLIP users need it

    arch, _, pretrained = spec.partition("@")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if pretrained:
        model = open_clip.create_model(arch, pretrained=pretrained)
        name, comparable = f"clip:{arch}@{pretrained}", True
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, pretrained=None)
        name, comparable = f"clip:{arch}@random-seed{seed} {NOT_COMPARABLE}", False
    return CLIPExtractor(model, open_clip.get_tokenizer(arch), name, comparable, resize).to(device)


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 50) -> Dict[str, torch.Tensor]:
    """Run ``extractor`` over ``images`` in batches and concatenate each feature kind."""
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        for key, value in extractor(images[start:start + batch_size]).items():
            parts.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def extractor_from_config(cfg, device: Optional[torch.device | str] = None) -> FeatureExtractor:
    """Build the extractor an ``ExtractorConfig`` names; ``auto`` prefers the pinned FID Inception when
    its weights are already on this machine and otherwise uses ``random-inception`` with a warning."""
    kw = dict(device=device, resize=cfg.resize, seed=cfg.seed)
    if cfg.name == "auto":
        try:
            return get_extractor("inception", weights=cfg.weights, sha256=cfg.sha256, allow_download=False, **kw)
        except FileNotFoundError as exc:
            import warnings

            warnings.warn(f"extractor=auto: {exc} Falling back to random-inception: the numbers are NOT "
                          "comparable with published FID.", stacklevel=2)
            return get_extractor("random-inception", input_size=cfg.input_size, **kw)
    return get_extractor(cfg.name, weights=cfg.weights, sha256=cfg.sha256, allow_download=cfg.allow_download,
                         input_size=cfg.input_size, **kw)


def _weights_file_of(name: str) -> Optional[wfile.WeightsFile]:
    """The published weights file an extractor name loads (None: random weights or a library's own)."""
    if name == "auto" or name in INCEPTION_NAMES:
        return inc.FID_WEIGHTS
    if name.startswith("dinov2:"):
        arch, tag, _ = _parse_dinov2(name, 0)
        return None if tag else dino.weights_file(arch)
    return None


def check_extractor_weights(cfg, prefix: str = "extractor", storage_cfg=None) -> Optional[str]:
    """Check the weights file an ``ExtractorConfig`` will load (the FID Inception's, DINOv2's) before
    any other work (an entry point calls this before it reads a checkpoint or makes a sample, so a
    wrong file costs seconds, not a night of sampling). Returns the file's local path, or None when
    no file is to be checked now: random weights, open_clip's own cache, or no file on this machine
    (``auto`` then falls back to ``random-inception``; the others download it, and the download is
    checked when loaded).

    The file is the one :func:`weights.resolve` finds (``<prefix>.weights``, the extractor's
    environment variable or the torch hub cache; a URL is fetched into the cache first, with
    ``storage_cfg``: the entry point's ``storage`` block, not configured yet at this point). It is
    checked against ``<prefix>.sha256`` or the extractor's pinned digest; with neither (DINOv2) it is
    hashed when loaded and the digest recorded. Raises :class:`weights.WeightsHashError` (a
    ``ValueError``) whose one line names where the file came from, ``<prefix>.sha256``, and the
    expected and actual digests; ``FileNotFoundError`` when a named file is missing."""
    spec = _weights_file_of(cfg.name)
    if spec is None:
        return None
    env = os.environ.get(spec.env_var) if spec.env_var else None
    try:
        path = wfile.resolve(spec, cfg.weights, allow_download=False, storage_cfg=storage_cfg)
    except FileNotFoundError:
        if cfg.name == "auto" or (not cfg.weights and not env and cfg.allow_download):
            return None
        raise
    if cfg.sha256 or spec.sha256:
        wfile.verify(spec, path, cfg.sha256, source=wfile.source_of(spec, cfg.weights, prefix),
                     hash_key=f"{prefix}.sha256")
    return path
