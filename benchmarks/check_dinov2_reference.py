"""Our DINOv2 extractor against Meta's own code, the way dgm-eval runs it (a reference check, not a timing).

Meta's code is not on PyPI, so this is not a CI test (``tests/unit/test_eval_dinov2.py`` checks against
Hugging Face's independent port instead). Run it with a checkout of facebookresearch/dinov2::

    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2
    python benchmarks/check_dinov2_reference.py --dinov2-repo /tmp/dinov2 --arch vits14 --arch vitl14

For each architecture: Meta's hub model (``dinov2_<arch>(pretrained=False)``) with random weights,
the layer-scale gammas drawn away from their 1e-5 start so that every block matters, is saved as a
``dinov2_<arch>_pretrain.pth`` file; ``get_extractor("dinov2:<arch>", weights=<that file>)`` loads it
through the real loading code; both see the same images: Meta's model after dgm-eval's transform
(torchvision ``Resize((224, 224), BICUBIC)`` on the PIL image, ``ToTensor``, ImageNet ``Normalize``),
ours after its own preprocessing (``resize=pil_bicubic_rgb``). Prints the largest absolute
difference of the features and of the Fréchet distance between two image sets.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def dgm_eval_features(model, images: np.ndarray) -> torch.Tensor:
    import torchvision.transforms as TF
    from PIL import Image

    transform = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                            TF.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    batch = torch.stack([transform(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        return model(batch).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov2-repo", required=True, help="a checkout of facebookresearch/dinov2")
    parser.add_argument("--arch", action="append", default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="side of the random test images (resized to 224)")
    args = parser.parse_args()
    sys.path.insert(0, args.dinov2_repo)
    from dinov2.hub import backbones  # Meta's code

    from ldm_scale.evaluation.fid import fid_from_stats, gaussian_stats
    from ldm_scale.evaluation.features import extract_features, get_extractor

    rng = np.random.default_rng(0)
    # smooth-ish images (low-resolution noise upsampled), so resizing matters as on photos
    low = rng.integers(0, 256, (2 * args.images, 3, args.size // 4, args.size // 4)).astype(np.float32)
    imgs = torch.nn.functional.interpolate(torch.from_numpy(low), size=(args.size, args.size), mode="bicubic")
    imgs = imgs.clamp(0, 255).round().to(torch.uint8)
    nhwc = imgs.permute(0, 2, 3, 1).contiguous().numpy()
    for arch in args.arch or ["vits14"]:
        torch.manual_seed(0)
        meta = getattr(backbones, f"dinov2_{arch}")(pretrained=False).eval()
        with torch.no_grad():
            for name, p in meta.named_parameters():
                if name.endswith(".gamma"):
                    p.copy_(0.5 + 0.2 * torch.randn_like(p))
                elif name in ("pos_embed", "cls_token"):
                    p.copy_(0.02 * torch.randn_like(p))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"dinov2_{arch}_pretrain.pth"
            torch.save(meta.state_dict(), path)
            ours = get_extractor(f"dinov2:{arch}", weights=str(path), resize="pil_bicubic_rgb")
        a = dgm_eval_features(meta, nhwc)
        b = extract_features(ours, imgs, batch_size=8)["pool"]
        fd_meta = fid_from_stats(gaussian_stats(a[: args.images].double().numpy()),
                                 gaussian_stats(a[args.images:].double().numpy()))
        fd_ours = fid_from_stats(gaussian_stats(b[: args.images].double().numpy()),
                                 gaussian_stats(b[args.images:].double().numpy()))
        rel = (a - b).abs().max().item() / a.abs().max().item()
        print(f"{arch}: features {tuple(b.shape)}  max |meta - ours| = {(a - b).abs().max().item():.3e} "
              f"(relative {rel:.3e});  FD between the two halves: meta {fd_meta:.6f}  ours {fd_ours:.6f}  "
              f"|diff| {abs(fd_meta - fd_ours):.3e}")


if __name__ == "__main__":
    main()
