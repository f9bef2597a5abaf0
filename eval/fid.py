"""FID / IS / precision-recall (+ KID, sFID, CLIP score) of an exported LDM checkpoint.

    python eval/fid.py ckpt=s3://bucket/runs/x/export.pt ref=s3://bucket/laion/{00000..00099}.tar \
        n_samples=50000 sampler.steps=200 sampler.eta=0 sampler.guidance_scale=1.5
    torchrun --nproc_per_node 8 eval/fid.py ckpt=... ref=data/reference_stats/inception-v3-fid-....npz
    python eval/fid.py ckpt=... ref=VIRTUAL_imagenet256_labeled.npz extractor=inception extractor.resize=tf_bilinear
    python eval/fid.py ckpt=... ref=... sampler=plms metrics=full precision=bf16
    python eval/fid.py preset=quickstart          # launch/quickstart.py's model and data, offline
    python eval/fid.py ckpt=... ref=... metrics=text guidance_scales=[1.5,3,5,8] out=sweep/   # FID vs CLIP score

Arguments are Hydra overrides of ``conf/commands/fid.yaml`` (typed by ``ldm_scale.evaluation.config.FIDEvalConfig``):
``key=value`` with dots for nested keys (``extractor.name=random-inception metrics.kid=true``) and
``group=option`` for the config groups ``--help`` lists (``sampler=``, ``extractor=``, ``metrics=``,
``preset=``). Re-running the same command
resumes: finished sample and feature chunks are kept. The JSON record is printed and written to
``<out>/results.json``. See docs/evaluation.md for the conventions and the Inception weights file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist  # noqa: E402
from ldm_scale.cli import config_from_argv, report_input_errors, start_command  # noqa: E402
from ldm_scale.evaluation.config import FIDEvalConfig  # noqa: E402
from ldm_scale.evaluation.evaluate import run_fid_eval  # noqa: E402
from ldm_scale.evaluation.features import check_extractor_weights  # noqa: E402
from ldm_scale.evaluation.sweep import run_guidance_sweep  # noqa: E402


def parse_config(argv: list[str]) -> FIDEvalConfig:
    return config_from_argv(argv, "fid", FIDEvalConfig, program="eval/fid.py", doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = start_command(argv, "fid", FIDEvalConfig, program="eval/fid.py", doc=__doc__)
    # The Inception weights' hash first: before any checkpoint is read or sample generated.
    report_input_errors("eval/fid.py", lambda: check_extractor_weights(cfg.extractor, storage_cfg=cfg.storage))
    run = run_guidance_sweep if cfg.guidance_scales else run_fid_eval
    record = report_input_errors("eval/fid.py", lambda: run(cfg))
    if record is not None and "sweep" in record:
        print(json.dumps({"metrics": record["metrics"], "sweep": record["run_dir"] + "/sweep.json"}, indent=1))
    elif record is not None:
        print(json.dumps({"metrics": record["metrics"], "extractor": record["extractor"]["name"],
                          "n_samples": record["n_samples"], "results": record["run_dir"] + "/results.json"},
                         indent=1))
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)  # exits without the teardown that can abort a gloo/NCCL process
