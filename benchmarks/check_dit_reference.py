"""Our DiT against the original facebookresearch/DiT code (a reference check, not a timing).

DiT's code is not on PyPI, so this is not a CI test (``tests/unit/test_dit.py`` checks against
diffusers' independent ports instead). Run it with a checkout of facebookresearch/DiT::

    git clone https://github.com/facebookresearch/DiT /tmp/DiT
    python benchmarks/check_dit_reference.py --dit-repo /tmp/DiT --model DiT-S/2 --model DiT-XL/2

For each model: DiT's own ``DiT_models[name](input_size=32, num_classes=1000)`` (learn_sigma=True, as
the release checkpoints) with every parameter drawn at random (its zero-initialised adaLN layers
would otherwise hide most of the network), its ``state_dict()`` saved as a release ``.pt`` file,
loaded into ``ldm_scale.models.dit.DiT`` by :func:`load_dit_release` (strict, by name), and both
run on the same latents, timesteps and labels (the null class 1000 included). Prints the parameter
counts and the largest absolute difference of the outputs, for the mean half (what ldm_scale
returns) and with classifier-free guidance through each model's own path (DiT's
``forward_with_cfg`` guides only latent channels 0-2; ldm_scale guides all four, so the guided
comparison covers those three).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dit-repo", required=True, help="a checkout of facebookresearch/DiT")
    parser.add_argument("--model", action="append", default=None, help="DiT-S/2 ... DiT-XL/8 (repeatable)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, args.dit_repo)
    from models import DiT_models  # the original code (needs timm)

    from ldm_scale.models.dit import DiT, dit_config, load_dit_release

    for name in args.model or ["DiT-S/2"]:
        size, patch = name.split("-", 1)[1].split("/")
        torch.manual_seed(0)
        ref = DiT_models[name](input_size=32, num_classes=1000).eval()
        with torch.no_grad():
            for p in ref.parameters():
                if p.requires_grad:  # pos_embed is DiT's fixed sin-cos table
                    p.normal_(0, 0.02)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name.replace('/', '-')}-256x256.pt"
            torch.save(ref.state_dict(), path)
            ours = DiT(dit_config(size, int(patch), num_classes=1001, learn_sigma=True, input_size=32)).eval()
            load_dit_release(ours, torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        n_ref = sum(p.numel() for p in ref.parameters())
        n_ours = sum(p.numel() for p in ours.parameters()) + ours.pos_embed.numel()  # DiT counts its table
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 4, 32, 32, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        y = torch.randint(0, 1000, (args.batch,), generator=g)
        y[-1] = 1000  # the null class
        with torch.no_grad():
            want = ref(x, t, y)[:, :4]
            got = ours(x, t, y=y)
            scale = 4.0
            y_null = torch.full_like(y, 1000)
            guided_ref = ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), scale)
            # DiT's forward_with_cfg guides only the first 3 of the 4 latent channels ("by default we
            # only apply guidance to three channels", models.py, kept for the paper's numbers);
            # ldm_scale guides all of them, so only those 3 are comparable.
            guided_ref = guided_ref[: args.batch, :3]
            cond, uncond = got, ours(x, t, y=y_null)
            guided_ours = uncond + scale * (cond - uncond)
        print(f"{name}: parameters DiT {n_ref:,} / ldm_scale {n_ours:,}; output |max| {want.abs().max():.4f}, "
              f"max |diff| {(got - want).abs().max():.3e}; guided (scale {scale}) max |diff| "
              f"{(guided_ours[:, :3] - guided_ref).abs().max():.3e} (channels 0-2, see above)")


if __name__ == "__main__":
    main()
