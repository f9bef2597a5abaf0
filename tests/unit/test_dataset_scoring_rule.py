"""The synthetic-shapes score applies only to the synthetic shapes: ``not_synthetic_reason`` reads the
dataset card make_synthetic writes, follows latent shards to the images they were encoded from, and
names the shard set that is not the synthetic data."""
from __future__ import annotations

import json

from ldm_scale import storage
from ldm_scale.data.latents import finalize_latent_dataset, load_autoencoder, precompute_latents
from ldm_scale.data.shard_writer import write_shard, write_sizes
from ldm_scale.data.synthetic import GENERATOR, make_sample, not_synthetic_reason, write_synthetic_dataset


def _lookalike_shards(url: str, n: int = 6) -> str:
    """Shards with the synthetic images and captions but without its card (someone else's data)."""
    samples = []
    for i in range(n):
        _, caption, jpg, meta = make_sample(0, i, min_size=32, max_size=36)
        samples.append({"__key__": f"{i:09d}", "jpg": jpg, "txt": caption, "json": meta})
    write_shard(url, 0, samples)
    write_sizes(url, {"00000.tar": n})
    return url + "/{00000..00000}.tar"


def test_synthetic_shards_and_their_latents_are_recognised(tmp_path):
    images = str(tmp_path / "shapes")
    write_synthetic_dataset(images, num_samples=8, samples_per_shard=4, seed=0, min_size=32, max_size=36)
    assert json.loads(storage.read_text(images + "/dataset.json"))["generator"] == GENERATOR
    pattern = images + "/{00000..00001}.tar"
    assert not_synthetic_reason([pattern]) is None
    assert not_synthetic_reason([images + "/*.tar"]) is None

    latents = str(tmp_path / "latents")
    model = load_autoencoder(None, "kl_tiny")
    precompute_latents(pattern, latents, model, resolution=32, dtype="float32")
    finalize_latent_dataset(pattern, latents, model, 32)
    assert not_synthetic_reason([latents + "/{00000..00001}.tar"]) is None


def test_other_shards_are_named(tmp_path):
    other = _lookalike_shards(str(tmp_path / "mine"))
    reason = not_synthetic_reason([other])
    assert reason is not None and str(tmp_path / "mine") in reason and "dataset.json" in reason

    shapes = str(tmp_path / "shapes")
    write_synthetic_dataset(shapes, num_samples=4, samples_per_shard=4, seed=0, min_size=32, max_size=36)
    mixture = not_synthetic_reason([shapes + "/00000.tar", other])  # one foreign set spoils a mixture
    assert mixture is not None and str(tmp_path / "mine") in mixture

    storage.write_text(str(tmp_path / "mine" / "dataset.json"), json.dumps({"generator": "my_scraper"}))
    assert "my_scraper" in not_synthetic_reason([other])


def test_latents_of_other_images_are_not_synthetic(tmp_path):
    other = _lookalike_shards(str(tmp_path / "mine"))
    latents = str(tmp_path / "latents")
    model = load_autoencoder(None, "kl_tiny")
    precompute_latents(other, latents, model, resolution=32, dtype="float32")
    finalize_latent_dataset(other, latents, model, 32)
    reason = not_synthetic_reason([latents + "/00000.tar"])
    assert reason is not None and "latents of" in reason and str(tmp_path / "mine") in reason
