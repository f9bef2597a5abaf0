"""data_tools/inspect_shards.py: counts, histograms, damaged members, sizes.json."""
from __future__ import annotations

import json

from ldm_scale import storage
from ldm_scale.data.shard_writer import tar_bytes
from ldm_scale.data.synthetic import write_synthetic_dataset


def _cli():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "inspect_shards.py")
    spec = importlib.util.spec_from_file_location("inspect_shards_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_counts_damage_and_writes_sizes(tmp_path, capsys):
    root = str(tmp_path)
    write_synthetic_dataset(root, num_samples=20, samples_per_shard=8, seed=0, min_size=32, max_size=40)
    storage.rm(root + "/sizes.json")
    whole = tar_bytes([{"__key__": f"k{i}", "jpg": b"\xff\xd8junk" * 50, "txt": "cap"} for i in range(3)])
    storage.write_bytes(root + "/00003.tar", whole[: 2 * 2560 + 512 + 100])  # cut inside sample 3's jpg
    assert _cli().main([root + "/{00000..00003}.tar", "--report", root + "/report.json", "--threads", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_shards"] == 4
    report = json.loads(storage.read_text(root + "/report.json"))
    assert report["damage"]["skip/truncated_member"] == 1 and report["damage"]["undecodable_image"] >= 1
    assert summary["num_samples"] == 22  # the sample cut short is not counted
    assert sum(report["caption_length_chars"].values()) == 22
    assert sum(report["metadata"]["aesthetic"].values()) == 20
    sizes = json.loads(storage.read_text(root + "/sizes.json"))
    assert sizes["00000.tar"] == 8 and sizes["00002.tar"] == 4 and sizes["00003.tar"] == 2
