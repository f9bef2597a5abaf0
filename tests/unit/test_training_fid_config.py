"""eval.fid.* (in-training FID) settings that eval/fid.py would refuse are refused by validate(),
before any step is trained; the FIDEvalConfig it builds is the one eval/fid.py would be given."""
from __future__ import annotations

import pytest

from ldm_scale import config as C
from ldm_scale.evaluation.in_training import fid_eval_config

BASE = ["experiment=quickstart", "data.urls=['s3://bucket/set/{00000..00099}.tar']", "checkpoint.root=/tmp/ckpt",
        "model.allow_random_first_stage=true"]
ON = ["eval.fid.every=100", "eval.fid.ref=s3://bucket/ref.npz"]


@pytest.mark.parametrize("overrides, message", [
    (["eval.fid.every=100"], "eval.fid.ref is not set"),
    ([*ON, "deepspeed=zero3"], "eval.fid.every > 0 with deepspeed.zero.stage=3"),
    ([*ON, "eval.fid.n_samples=50", "eval.fid.kid_subset_size=100"], "eval.fid.kid_subset_size=100 > eval.fid.n_samples=50"),
    ([*ON, "eval.fid.every=-1"], "eval.fid.every=-1 must be >= 0"),
])
def test_bad_in_training_fid_settings_fail_in_validate(overrides, message):
    cfg = C.to_object(C.compose([*BASE, *overrides]))
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        C.validate(cfg, 2, check_files=False)


def test_the_eval_fid_config_is_built_from_the_run_and_passes_eval_fid_checks():
    cfg = C.to_object(C.compose([*BASE, *ON, "eval.fid.n_samples=500", "eval.fid.extractor=inception",
                                 "eval.sampler.steps=30", "eval.seed=7"]))
    C.validate(cfg, 2, check_files=False)
    f = fid_eval_config(cfg, "/tmp/out")
    assert (f.ref, f.n_samples, f.seed, f.out) == ("s3://bucket/ref.npz", 500, 7, "/tmp/out")
    assert f.sampler == cfg.eval.sampler and f.sampler.steps == 30
    assert f.extractor.name == "inception" and not f.extractor.allow_download
    assert f.metrics.fid and f.metrics.kid and not f.metrics.inception_score
    assert f.precision == cfg.deepspeed.precision and f.logger.backend == "none"
    f.check()  # what validate() accepted, eval/fid.py accepts


def test_autoencoders_refuse_in_training_fid():
    cfg = C.to_object(C.compose(["experiment=autoencoder_tiny", "data.urls=['s3://b/s/{0..9}.tar']",
                                 "checkpoint.root=/tmp/ckpt", *ON]))
    with pytest.raises(C.ConfigError, match="set eval.fid.every=0 for task=autoencoder"):
        C.validate(cfg, 2, check_files=False)
