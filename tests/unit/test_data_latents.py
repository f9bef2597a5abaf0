"""Latent shards: precompute (split over ranks, resumable) and read back through the loader."""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from ldm_scale import storage
from ldm_scale.data import DataConfig, build_loader
from ldm_scale.data.latents import load_autoencoder, posterior_moments
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo


def _export_tiny_autoencoder(path: str) -> torch.nn.Module:
    from ldm_scale.models import AUTOENCODERS, build_autoencoder

    torch.manual_seed(0)
    model = build_autoencoder("kl_tiny")
    torch.save({"format": "ldm_scale/autoencoder-v1", "model_config": dataclasses.asdict(AUTOENCODERS["kl_tiny"]),
                "state_dict": model.state_dict(), "ema_state_dict": None, "scale_factor": 1.0, "step": 0,
                "config": {}}, path)
    return model.eval()


def test_precompute_resume_and_load(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_cli", os.path.join(
        os.path.dirname(__file__), "..", "..", "data_tools", "precompute_latents.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    src, out = str(tmp_path / "img"), str(tmp_path / "lat")
    write_synthetic_dataset(src, num_samples=24, samples_per_shard=8, seed=0, min_size=32, max_size=48)
    ckpt = str(tmp_path / "ae.pt")
    model = _export_tiny_autoencoder(ckpt)
    pattern = src + "/{00000..00002}.tar"
    args = [f"data={pattern}", f"out={out}", f"ckpt={ckpt}", "resolution=32", "batch_size=5", "dtype=float32"]
    assert cli.main(args) == 0
    assert json.loads(storage.read_text(out + "/sizes.json")) == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 8}
    meta = json.loads(storage.read_text(out + "/dataset.json"))
    assert meta["latent_shape"] == [4, 8, 8]

    # a shard whose completion marker is missing (a crash mid-shard) is redone; the others are not
    os.remove(out + "/00001_stats.json")
    before = os.path.getmtime(out + "/00000.tar")
    from ldm_scale.data.latents import precompute_latents

    result = precompute_latents(pattern, out, load_autoencoder(ckpt), resolution=32, dtype="float32")
    assert [u.rsplit("/", 1)[1] for u in result.encoded] == ["00001.tar"]
    assert len(result.skipped_complete) == 2 and os.path.getmtime(out + "/00000.tar") == before

    images = {}
    img_cfg = DataConfig(urls=[pattern], resolution=32, num_workers=0, shuffle_buffer=0)
    for batch in build_loader(img_cfg, DistInfo(), batch_size=4, seed=0):
        images.update(zip(batch["key"], batch["image"]))
    lat_cfg = DataConfig(urls=[out + "/{00000..00002}.tar"], input="latent", num_workers=2, shuffle_buffer=4)
    seen = 0
    for batch in build_loader(lat_cfg, DistInfo(), batch_size=4, seed=0):
        expected = posterior_moments(model, torch.stack([images[k] for k in batch["key"]]))
        torch.testing.assert_close(batch["latent_mean"], expected[:, 0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch["latent_logvar"], expected[:, 1], rtol=1e-4, atol=1e-4)
        assert len(batch["caption"]) == 4
        seen += 4
    assert seen == 24


def test_ranks_split_shards(tmp_path):
    from ldm_scale.data.latents import precompute_latents

    src = str(tmp_path / "img")
    write_synthetic_dataset(src, num_samples=12, samples_per_shard=4, seed=1, min_size=32, max_size=36)
    model = load_autoencoder(None, "kl_tiny")
    done = []
    for rank in range(2):
        r = precompute_latents(src + "/{00000..00002}.tar", str(tmp_path / "lat"), model, resolution=32,
                               rank=rank, world_size=2)
        done.append([u.rsplit("/", 1)[1] for u in r.encoded])
    assert done == [["00000.tar", "00002.tar"], ["00001.tar"]]
