"""Sample images from an exported LDM checkpoint (a thin shell over :func:`ldm_scale.sampling.run`).

    python launch/sample.py ckpt=s3://bucket/exports/txt2img.pt prompt="a red circle, on grey" \
        n_samples=4 n_iter=4 sampler.guidance_scale=5.0 sampler.steps=50 sampler.eta=0.0 H=256 W=256 seed=42
    python launch/sample.py ckpt=model.pt from_file=prompts.txt sampler=plms precision=bf16
    python launch/sample.py ckpt=model.pt prompt="..." init_image=in.png strength=0.8     # img2img
    python launch/sample.py ckpt=model.pt prompt="..." init_image=in.png mask=mask.png    # inpainting

Arguments are Hydra overrides of ``conf/commands/sample.yaml`` (typed by ``ldm_scale.sampling.SampleConfig``):
``key=value``, ``sampler.<key>=`` for the sampler the training run's ``eval.sampler`` and
``eval/fid.py`` share, and ``sampler=ddim|plms|ddpm`` for its config group (``--help`` lists them).
Writes ``<outdir>/samples/NNNNN.png``, ``<outdir>/grid-NNNN.png`` (n_iter rows x n_samples columns)
and ``<outdir>/samples.json``. See docs/sampling.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist  # noqa: E402
from ldm_scale.cli import compose_command, report_input_errors, start_command  # noqa: E402
from ldm_scale.sampling import SampleConfig, run  # noqa: E402


def parse(argv: list[str]) -> SampleConfig:
    """Hydra overrides on ``conf/commands/sample.yaml``; a bad key, type or choice raises ``ValueError`` naming it."""
    return compose_command("sample", SampleConfig, argv)


def main(argv: list[str]) -> int:
    try:  # exit statuses as returned values: tests and launch/quickstart.py call main() in-process
        cfg = start_command(argv, "sample", SampleConfig, program="launch/sample.py", doc=__doc__)
        summary = report_input_errors("launch/sample.py", lambda: run(cfg))
    except SystemExit as exc:
        return int(exc.code or 0)
    print(f"wrote {len(summary['samples'])} samples to {cfg.outdir}/samples and the grid {summary['grid']}")
    return 0


if __name__ == "__main__":
    dist.run_entry_point(lambda: main(sys.argv[1:]))  # exits without the teardown that can abort a gloo/NCCL process
