"""Reconstruction metrics of an autoencoder: PSNR, SSIM, LPIPS, rFID and the latent std (-> the LDM
scale factor), over a shard set, split over ranks, as JSON.

    python eval/recon.py ckpt=s3://bucket/ckpt/ae-run/export.pt data='s3://bucket/val/{00000..00009}.tar'
    torchrun --nproc_per_node 8 eval/recon.py ckpt=... data=... num_images=50000 out=s3://bucket/ae-run/recon.json
    python eval/recon.py ckpt=... data=... lpips.backbone_weights=random extractor=random_inception  # offline

Arguments are Hydra overrides of ``conf/commands/recon.yaml`` (typed by
``ldm_scale.evaluation.recon.ReconEvalConfig``): ``key=value``, nested keys with dots, and
``extractor=<option>`` (``--help`` lists the groups). ``ckpt`` is an exported autoencoder or a training checkpoint (``step_<N>`` / run
directory). The JSON record is printed on rank 0 and written to ``out`` when given. Conventions in
docs/autoencoders.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist  # noqa: E402
from ldm_scale.cli import config_from_argv, report_input_errors, start_command  # noqa: E402
from ldm_scale.evaluation.features import check_extractor_weights  # noqa: E402
from ldm_scale.evaluation.recon import ReconEvalConfig, run_recon_eval  # noqa: E402


def parse_config(argv: list[str]) -> ReconEvalConfig:
    return config_from_argv(argv, "recon", ReconEvalConfig, program="eval/recon.py", doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = start_command(argv, "recon", ReconEvalConfig, program="eval/recon.py", doc=__doc__)
    if cfg.rfid:  # the Inception weights' hash first: before the checkpoint is read
        report_input_errors("eval/recon.py", lambda: check_extractor_weights(cfg.extractor))
    record = report_input_errors("eval/recon.py", lambda: run_recon_eval(cfg))
    if record is not None:
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)  # exits without the teardown that can abort a gloo/NCCL process
