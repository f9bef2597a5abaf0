"""README's "Train on your own images", run as written on real images: scikit-learn's 1,797
handwritten digit scans (8x8, upscaled to 32 px PNGs, captioned "a handwritten digit 7"), served by
``python -m http.server`` on 127.0.0.1 and turned into shards by the real img2dataset, then inspect ->
vocabulary -> autoencoder -> latents -> text-to-image LDM (2 ranks) -> sample -> FID.

The commands are read from README.md between its ``own-data`` markers, so the README cannot drift
from what is tested. What the test changes, and nothing else:

* ``parquet=my_images.parquet`` names the digits' parquet; the commands run in a temporary directory (so their
  relative outputs land there) with the scripts' paths made absolute;
* ``torchrun --nproc_per_node N`` is the test suite's torchrun with the same N (c10d rendezvous on a
  free 127.0.0.1 port);
* the documented shortening: ``train.max_steps=30`` appended to both training commands, and
  ``n_samples=64 extractor.input_size=96`` to eval/fid.py (its CPU smoke settings, as in its
  quickstart preset).

All 1,797 images are used: img2dataset fetches them in ~13 s and the autoencoder encodes them in ~8 s,
so a subset would save little. Outcomes are checked on structured outputs (exit codes, JSON records,
result.json, metrics.jsonl, export files, PNGs), never on log wording.
"""
from __future__ import annotations

import json
import math
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.s3 import free_port
from tests.fixtures.torchrun import REPO_ROOT, child_env, run_torchrun

pytest.importorskip("img2dataset", reason="CI installs it with the dev extra; pip install 'ldm_scale[img2dataset]'")
pytest.importorskip("sklearn", reason="the digit scans ship with scikit-learn (dev extra)")

pytestmark = [pytest.mark.dist, pytest.mark.slow]

BEGIN, END = "<!-- own-data:begin -->", "<!-- own-data:end -->"
PARQUET_PLACEHOLDER = "my_images.parquet"
STEPS = 30
NUM_IMAGES = 1797
SHORTEN = {
    "launch/train.py": [f"train.max_steps={STEPS}"],
    "eval/fid.py": ["n_samples=64", "extractor.input_size=96"],
}


def readme_commands() -> list[list[str]]:
    """The shell commands of README.md's own-data section (continuations joined, comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, f"README.md lost its {BEGIN} ... {END} section"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    body = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_digits(root: Path, base_url: str) -> Path:
    """The digit scans as 32 px PNGs under ``root/www`` and a parquet of (url, caption, label)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    www = root / "www"
    www.mkdir()
    rows = []
    for i, (scan, label) in enumerate(zip(digits.images, digits.target)):
        ink = (255 - scan * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0..16 ink -> dark on white
        Image.fromarray(ink).resize((32, 32), Image.BICUBIC).convert("RGB").save(www / f"{i:04d}.png")
        rows.append({"url": f"{base_url}/{i:04d}.png", "caption": f"a handwritten digit {label}", "label": int(label)})
    parquet = root / "digits.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return parquet


@pytest.fixture
def digits_server(tmp_path):
    """``python -m http.server`` on 127.0.0.1 serving the digit PNGs; stopped by its PID."""
    port = free_port()
    parquet = write_digits(tmp_path, f"http://127.0.0.1:{port}")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                               "--directory", str(tmp_path / "www")], env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield parquet
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_readme_command(argv: list[str], parquet: Path, cwd: Path) -> str:
    """Run one README command with the substitutions of the module docstring; returns its stdout."""
    argv = [f"parquet={parquet}" if a == f"parquet={PARQUET_PLACEHOLDER}" else a for a in argv]
    nproc = None
    if argv[0] == "torchrun":
        assert argv[1] == "--nproc_per_node", argv
        nproc, argv = int(argv[2]), argv[3:]
    elif argv[0] == "python":
        argv = argv[1:]
    else:
        raise AssertionError(f"README command starts with {argv[0]!r}: expected python or torchrun")
    script, args = argv[0], argv[1:] + SHORTEN.get(argv[0], [])
    assert (REPO_ROOT / script).is_file(), f"README names {script}, which does not exist"
    command = [str(REPO_ROOT / script), *args]
    env = {"NO_ALBUMENTATIONS_UPDATE": "1"}
    if nproc is not None:
        result = run_torchrun(command, nproc=nproc, cwd=cwd, env=env, timeout=900)
    else:
        result = subprocess.run([sys.executable, *command], cwd=cwd, env=child_env(env), capture_output=True,
                                text=True, timeout=900, check=False)
    assert result.returncode == 0, (f"{script} {' '.join(args)} exited with {result.returncode}\n--- stdout ---\n"
                                    f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}")
    return result.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def finite_losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), rows
    return losses


@pytest.mark.timeout(2400)
def test_readme_own_images_commands_train_sample_and_score(digits_server, tmp_path):
    import torch
    from PIL import Image

    commands = readme_commands()
    scripts = [next(a for a in c if a.endswith(".py")) for c in commands]
    assert scripts == ["data_tools/download.py", "data_tools/inspect_shards.py", "data_tools/build_vocab.py",
                       "launch/train.py", "data_tools/precompute_latents.py", "launch/train.py",
                       "launch/sample.py", "eval/fid.py"], scripts
    work = tmp_path / "work"
    work.mkdir()
    out = [run_readme_command(c, digits_server, work) for c in commands]
    download, _, vocab, _, latents, _, _, _ = out

    # Shards: every image arrived, and the report's sizes.json agrees.
    totals = last_json(download)
    assert totals["successes"] == NUM_IMAGES and totals["failed"] == 0
    assert sum(json.loads((work / "data/mine/sizes.json").read_text()).values()) == NUM_IMAGES

    # Vocabulary: ten digits and three words, well inside the word-vocabulary rule.
    record = last_json(vocab)
    assert record["tokenizer"] == "wordpiece" and record["captions"] == NUM_IMAGES
    assert record["tokens"] == 4 + 13 and (work / "data/mine_vocab.txt").read_text().split() == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", *"0123456789", "a", "digit", "handwritten"]

    # Autoencoder: completed, finite losses, an exported first stage.
    ae = json.loads((work / "runs/mine-ae/result.json").read_text())
    assert ae["stop_reason"] == "completed" and ae["step"] == STEPS
    finite_losses(work / "runs/mine-ae/metrics.jsonl")
    ae_export = torch.load(work / "runs/checkpoints/mine-ae/export.pt", map_location="cpu", weights_only=False)
    assert ae_export["format"] == "ldm_scale/autoencoder-v1"

    # Latents of every image.
    assert last_json(latents)["num_samples"] == NUM_IMAGES
    assert json.loads((work / "data/mine_latents/dataset.json").read_text())["kind"] == "latent"

    # LDM: completed, finite losses, a sample grid, an export with the word vocabulary; nothing scored
    # with the synthetic-shapes detector.
    ldm = json.loads((work / "runs/mine-ldm/result.json").read_text())
    assert ldm["stop_reason"] == "completed" and ldm["step"] == STEPS
    assert "eval/prompt_adherence" not in ldm
    finite_losses(work / "runs/mine-ldm/metrics.jsonl")
    assert list((work / "runs/mine-ldm/samples").glob("*.png"))
    export = torch.load(work / "runs/checkpoints/mine-ldm/export.pt", map_location="cpu", weights_only=False)
    tokenizer = export["model_config"]["cond_stage"]["text"]["tokenizer"]
    assert export["format"] == "ldm_scale/ldm-v1" and tokenizer["kind"] == "wordpiece"
    assert tokenizer["vocab_path"] == "data/mine_vocab.txt"

    # Samples: four 32 px PNGs.
    pngs = sorted((work / "runs/mine-samples/samples").glob("*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size == (32, 32) for p in pngs)

    # FID record.
    fid = json.loads((work / "runs/mine-fid/results.json").read_text())
    assert fid["n_samples"] == 64 and math.isfinite(fid["metrics"]["fid"])
