"""Sample images from an exported LDM checkpoint (a thin shell over :func:`ldm_scale.sampling.run`).

    python launch/sample.py ckpt=s3://bucket/exports/txt2img.pt prompt="a red circle" \
        n_samples=4 n_iter=4 scale=5.0 ddim_steps=50 ddim_eta=0.0 H=256 W=256 seed=42
    python launch/sample.py ckpt=model.pt from_file=prompts.txt sampler=plms precision=bf16
    python launch/sample.py ckpt=model.pt prompt="..." init_image=in.png strength=0.8     # img2img
    python launch/sample.py ckpt=model.pt prompt="..." init_image=in.png mask=mask.png    # inpainting

Arguments are ``key=value`` (OmegaConf dotlist) checked against ``SampleConfig``; writes
``<outdir>/samples/NNNNN.png``, ``<outdir>/grid-NNNN.png`` (n_iter rows x n_samples columns) and
``<outdir>/samples.json``. See docs/sampling.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm_scale.evaluation.cli import compose_config  # noqa: E402
from ldm_scale.sampling import SampleConfig, run  # noqa: E402


def parse(argv: list[str]) -> SampleConfig:
    """``key=value`` arguments on ``SampleConfig``; a bad key or value raises ``ValueError`` naming it."""
    return compose_config(SampleConfig, argv)


def usage() -> str:
    fields = OmegaConf.structured(SampleConfig)
    keys = "\n".join(f"  {k}={OmegaConf.to_yaml({k: v}).split(': ', 1)[1].strip()}" for k, v in fields.items())
    return f"{__doc__}\nKeys and defaults:\n{keys}"


def main(argv: list[str]) -> int:
    from ldm_scale.logging import setup_console

    setup_console()  # library warnings off (LDM_SCALE_SHOW_LIBRARY_WARNINGS=1 shows them)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = parse(argv)
        summary = run(cfg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"launch/sample.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary['samples'])} samples to {cfg.outdir}/samples and the grid {summary['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
