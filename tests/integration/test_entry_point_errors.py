"""The real entry points refuse unusable input with one line on stderr and exit status 2, before any
work: ``launch/train.py`` (a key the schema lacks, a bad ``model.first_stage_ckpt``: nothing is
written), and ``eval/fid.py`` / ``eval/recon.py`` for a missing, non-export or wrong-kind checkpoint,
in the same words as ``launch/sample.py``."""
from __future__ import annotations

import pytest

from tests.fixtures.exports import write_autoencoder_export, write_bad_first_stages
from tests.fixtures.torchrun import run_python


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {"autoencoder": write_autoencoder_export(root / "kl_tiny.pt"), **write_bad_first_stages(root)}


def stderr_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-4000:]
    return lines[0]


def train(tmp_path, *overrides: str, options: tuple = ()):
    return run_python(["launch/train.py", *options, "experiment=quickstart", "data.urls=['s3://bucket/set/{00000..00099}.tar']",
                       f"checkpoint.root={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'runs'}", *overrides],
                      timeout=300)


@pytest.mark.parametrize("case", ["missing", "ldm_export", "other_latent_width"])
def test_train_rejects_a_bad_first_stage_before_the_run_directory(tmp_path, files, case):
    url = files[case]
    result = train(tmp_path, f"model.first_stage_ckpt={url}")
    assert result.returncode == 2, result.stderr[-4000:]
    assert stderr_line(result).startswith(f"launch/train.py: invalid configuration: model.first_stage_ckpt={url} ")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_train_rejects_unknown_keys_however_added(tmp_path):
    extra = tmp_path / "extra_conf"
    (extra / "experiment").mkdir(parents=True)
    (extra / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  max_step: 10\n")
    for overrides, message in [
        (["+train.max_step=10"], "launch/train.py: unknown config key train.max_step: did you mean train.max_steps?"),
        (["experiment=typo"],
         "launch/train.py: In 'experiment/typo': unknown config key train.max_step: did you mean train.max_steps?"),
    ]:
        result = train(tmp_path, "model.allow_random_first_stage=true", *overrides, options=("--config-dir", str(extra)))
        assert result.returncode == 2, result.stderr[-4000:]
        assert stderr_line(result) == message
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["missing", "not_an_export", "wrong_kind"])
def test_eval_entry_points_report_a_bad_checkpoint_in_one_line(tmp_path, files, case):
    # fid.py and sample.py need an LDM export (an autoencoder is the wrong kind); recon.py the reverse.
    ldm_ckpt = files["autoencoder"] if case == "wrong_kind" else files[case]
    ae_ckpt = files["ldm_export"] if case == "wrong_kind" else files[case]
    runs = {
        "eval/fid.py": ["eval/fid.py", f"ckpt={ldm_ckpt}", f"ref={tmp_path / 'ref.npz'}", f"out={tmp_path / 'fid'}"],
        "eval/recon.py": ["eval/recon.py", f"ckpt={ae_ckpt}", f"data={tmp_path / 'val.tar'}"],
    }
    if case == "wrong_kind":  # the reference; the other cases reach the same reader (sampling.read_checkpoint)
        runs["launch/sample.py"] = ["launch/sample.py", f"ckpt={ldm_ckpt}", "prompt=a red circle",
                                    f"outdir={tmp_path / 's'}"]
    messages = {}
    for program, argv in runs.items():
        result = run_python(argv, timeout=300)
        assert result.returncode == 2, (program, result.stderr[-4000:])
        line = stderr_line(result)
        assert line.startswith(f"{program}: error: "), line
        messages[program] = line.split(": error: ", 1)[1]
    assert messages["eval/fid.py"] == messages.get("launch/sample.py", messages["eval/fid.py"])
    expected = {"missing": "checkpoint not found", "not_an_export": "is not a readable torch checkpoint",
                "wrong_kind": "export"}[case]
    assert all(expected in m for m in messages.values()), messages
    assert not (tmp_path / "fid").exists()
