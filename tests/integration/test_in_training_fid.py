"""In-training FID (``eval.fid.*``, evaluation/in_training.py) is eval/fid.py's number: a 4-step
run on 2 ranks evaluates its EMA weights at the end; ``eval/fid.py`` on the run's export with the
same settings (reference shards, N, chunking, sampler, seed, extractor, metrics) gives the same FID
and KID, (bit for bit), and reuses the reference statistics the run computed and stored once.

Random-weight Inception at 75 px (offline, named as not comparable in both records) and 2 DDIM
steps keep it to seconds; the code path is the one a real run uses."""
from __future__ import annotations

import json

import pytest
import yaml

from ldm_scale.data.synthetic import write_synthetic_dataset
from tests.fixtures.torchrun import run_python, run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

N, CHUNK, STEPS = 12, 4, 4


def test_in_training_fid_equals_eval_fid_on_the_export(tmp_path):
    train_url = write_shards(tmp_path / "data")
    write_synthetic_dataset(str(tmp_path / "ref"), num_samples=32, samples_per_shard=16, seed=1, min_size=32,
                            max_size=40)
    ref = f"{tmp_path}/ref/{{00000..00001}}.tar"
    out = tmp_path / "runs"
    args = [a for a in tiny_overrides(train_url, out, STEPS) if not a.startswith("checkpoint.export_final")]
    run_torchrun([TRAIN_SCRIPT, *args, "run_id=fid-run", f"checkpoint.root={tmp_path}/ckpt",
                  "checkpoint.export_final=true", f"eval.fid.every={STEPS}", f"eval.fid.ref='{ref}'",
                  f"eval.fid.n_samples={N}", f"eval.fid.batch_size={CHUNK}", "eval.fid.extractor=random-inception",
                  "eval.fid.extractor_input_size=75", "eval.fid.kid_subset_size=8", "eval.sampler.steps=2"],
                 timeout=900).check()
    run_dir = out / "fid-run"
    live = json.loads((run_dir / "fid" / f"step_{STEPS}" / "results.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval/fid"] == live["metrics"]["fid"] and result["eval/kid"] == live["metrics"]["kid"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/fid" in r] == [STEPS]  # once: the end is a multiple of every

    sampler = yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["sampler"]
    offline = tmp_path / "offline"
    run_python(["eval/fid.py", f"ckpt={tmp_path}/ckpt/fid-run/export.pt", f"ref='{ref}'", f"n_samples={N}",
                f"batch_size={CHUNK}", "seed=1234", *[f"sampler.{k}={v}" for k, v in sampler.items()],
                "extractor.name=random-inception", "extractor.input_size=75", "metrics.inception_score=false",
                "metrics.precision_recall=false", "metrics.kid=true", "metrics.kid_subset_size=8", "precision=fp32",
                f"out={offline}", "logger.backend=none"], timeout=600).check()
    record = json.loads((offline / "results.json").read_text())
    assert record["checkpoint"]["weights"] == "ema"
    # The same reference file: computed once by the run, stored next to the shards, reused here.
    assert record["reference"]["url"] == live["reference"]["url"] and record["reference"]["url"].endswith(".npz")
    # Exactly: the same samples (per-sample seeding, same chunks), features and statistics.
    assert record["metrics"] == live["metrics"], (record["metrics"], live["metrics"])
    assert set(live["metrics"]) == {"fid", "kid", "kid_std"}
