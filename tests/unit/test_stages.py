"""train.stages (config/stages.py): stage configurations, the checks of the list and of every stage
before any work, and which stage a resumed step is in."""
from __future__ import annotations

import pytest

from ldm_scale import config as C
from ldm_scale.config.stages import stage_at, stage_configs, stage_data_seed

URLS = ["data.urls=['s3://bucket/shapes/{00000..00003}.tar']", "checkpoint.root=s3://bucket/ckpt",
        "model.allow_random_first_stage=true"]
TWO = ("train.stages=[{start_step: 0, overrides: []}, {start_step: 600, overrides: ['data.resolution=64', "
       "'model.ldm.image_size=64', 'train.micro_batch_size=4', 'optim.lr=1e-4']}]")


def _cfg(*overrides: str) -> C.Config:
    return C.to_object(C.compose(["experiment=quickstart", *URLS, *overrides]))


def test_each_stage_is_the_run_with_its_overrides():
    cfg = _cfg(TWO)
    stages = stage_configs(cfg)
    assert [(a, b) for a, b, _ in stages] == [(0, 600), (600, 1300)]
    first, second = stages[0][2], stages[1][2]
    assert (first.data.resolution, first.model.ldm.image_size, first.train.micro_batch_size, first.optim.lr) == \
        (32, 32, 16, 2e-3)
    assert (second.data.resolution, second.model.ldm.image_size, second.train.micro_batch_size, second.optim.lr) == \
        (64, 64, 4, 1e-4)
    assert second.data.mode == cfg.data.mode and isinstance(second.data.mode, str)  # choices stay plain strings
    assert not first.train.stages and not second.train.stages
    plan = C.validate(cfg, world_size=2, check_files=False)
    assert plan.image_size == 32  # the first stage's plan
    assert C.validate(second, world_size=2, check_files=False).latent_size == 16


@pytest.mark.parametrize("stages, message", [
    ("[{start_step: 5, overrides: []}]", "train.stages[0].start_step=5: the first stage starts at step 0"),
    ("[{start_step: 0, overrides: []}, {start_step: 0, overrides: []}]", "is not after stage 0's 0"),
    ("[{start_step: 0, overrides: []}, {start_step: 1300, overrides: []}]", "is not before train.max_steps=1300"),
    ("[{start_step: 0, overrides: ['deepspeed.zero.stage=3']}]", "deepspeed.zero.stage cannot change between stages"),
    ("[{start_step: 0, overrides: ['seed=3']}]", "seed cannot change between stages"),
    ("[{start_step: 0, overrides: [data.resolution]}]", "is not key=value"),
])
def test_a_bad_stage_list_is_refused_with_the_key(stages, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.validate(_cfg(f"train.stages={stages}"), world_size=2, check_files=False)


def test_every_stage_is_validated_and_its_problems_name_it():
    bad = ("train.stages=[{start_step: 0, overrides: []}, {start_step: 10, overrides: ['data.resolution=64', "
           "'train.micro_batch_size=0']}]")
    with pytest.raises(C.ConfigError) as err:
        C.validate(_cfg(bad), world_size=2, check_files=False)
    message = str(err.value)
    assert "train.stages[1]: data.resolution=64 but model tiny is built for 32px images" in message
    assert "train.stages[1]: train.micro_batch_size" in message
    assert "train.stages[0]" not in message
    with pytest.raises(C.ConfigError, match=r"train.stages\[1\].overrides: .*data.resolution"):
        stage_configs(_cfg("train.stages=[{start_step: 0, overrides: []}, {start_step: 10, overrides: "
                           "['data.resolution=high']}]"))


def test_a_resumed_step_lands_in_its_stage():
    starts = [0, 600, 900]
    assert [stage_at(starts, s) for s in (0, 1, 599, 600, 601, 899, 900, 5000)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_later_stages_read_the_data_in_another_order():
    assert stage_data_seed(7, 0) == 7
    assert len({stage_data_seed(7, k) for k in range(4)}) == 4
    assert stage_data_seed(7, 2) == stage_data_seed(7, 2)
