"""data_tools/inspect_shards.py: counts, histograms, damaged members, sizes.json, failed downloads from
img2dataset's stats files (local and S3); the download tool's column choice and totals."""
from __future__ import annotations

import json

import pytest

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
    assert _cli().main([f"data={root}/{{00000..00003}}.tar", f"report={root}/report.json", "threads=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_shards"] == 4
    report = json.loads(storage.read_text(root + "/report.json"))
    assert report["damage"]["skip/truncated_member"] == 1 and report["damage"]["undecodable_image"] >= 1
    assert summary["num_samples"] == 22  # the sample cut short is not counted
    assert sum(report["caption_length_chars"].values()) == 22
    assert sum(report["metadata"]["aesthetic"].values()) == 20
    sizes = json.loads(storage.read_text(root + "/sizes.json"))
    assert sizes["00000.tar"] == 8 and sizes["00002.tar"] == 4 and sizes["00003.tar"] == 2


def test_inspect_writes_the_aspect_histogram_make_synthetic_wrote(tmp_path):
    """aspects.json (data.buckets' epoch plan) from the image headers equals the one the generator
    wrote from the sizes it rendered."""
    root = str(tmp_path)
    write_synthetic_dataset(root, num_samples=30, samples_per_shard=8, seed=2, min_size=32, max_size=80,
                            max_aspect=3.0)
    written = json.loads(storage.read_text(root + "/aspects.json"))
    storage.rm(root + "/aspects.json")
    assert _cli().main([f"data={root}/{{00000..00003}}.tar", "threads=2"]) == 0
    assert json.loads(storage.read_text(root + "/aspects.json")) == written
    assert sum(sum(h.values()) for h in written.values()) == 30 and len({b for h in written.values() for b in h}) > 10


@pytest.mark.parametrize("where", ["local", "s3"])
def test_inspect_reports_failed_downloads_from_the_stats_files(where, tmp_path, capsys, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_server").url("set")
    write_synthetic_dataset(root, num_samples=20, samples_per_shard=8, seed=0, min_size=32, max_size=40)
    first = json.loads(storage.read_text(root + "/00000_stats.json"))
    # Shard 1 as img2dataset writes it after 3 URLs of 11 failed; shard 2 has no stats file.
    storage.write_text(root + "/00001_stats.json", json.dumps({
        "count": 11, "successes": 8, "failed_to_download": 3, "failed_to_resize": 0,
        "status_dict": {"success": 8, "HTTP Error 404: File not found": 2, "<urlopen error timed out>": 1}}))
    storage.rm(root + "/00002_stats.json")
    assert _cli().main([f"data={root}/{{00000..00002}}.tar", "write_sizes=false", f"report={root}/report.json"]) == 0
    out, err = capsys.readouterr()
    downloads = json.loads(out)["downloads"]
    attempted = int(first["count"]) + 11
    assert downloads["attempted"] == attempted and downloads["successes"] == int(first["successes"]) + 8
    assert downloads["failed"] == int(first["count"]) - int(first["successes"]) + 3
    assert downloads["failed_by_error"] == {"HTTP Error 404: File not found": 2, "<urlopen error timed out>": 1}
    assert downloads["stats_files"] == 2 and downloads["shards_without_stats"] == 1
    assert downloads["shards_differing_from_stats"] == []
    assert (f"downloads: {attempted} attempted, {downloads['successes']} written, {downloads['failed']} failed "
            "(HTTP Error 404: File not found: 2, <urlopen error timed out>: 1); 1 shard(s) without a _stats.json"
            ) in err
    report = json.loads(storage.read_text(root + "/report.json"))
    assert report["downloads"] == downloads
    assert [s["download_stats"] is None for s in report["shards"]] == [False, False, True]


def test_download_totals_and_extra_columns_choice():
    from ldm_scale.data.download import extra_columns, parse_extra_columns
    from ldm_scale.data.shard_stats import summarise_download_stats

    cols = ["url", "caption", "label", "width", "aesthetic"]
    assert extra_columns(cols, "all") == ["label", "aesthetic"]  # width is img2dataset's own field
    assert extra_columns(cols, "none") == []
    assert extra_columns(cols, parse_extra_columns("aesthetic, label")) == ["aesthetic", "label"]
    assert parse_extra_columns("none") == "none" and parse_extra_columns("all") == "all"
    with pytest.raises(ValueError, match=r"\['lable'\] are not in the input"):
        extra_columns(cols, ["lable"])
    with pytest.raises(ValueError, match="width"):
        extra_columns(cols, ["width"])
    with pytest.raises(ValueError):
        parse_extra_columns(" , ")
    totals = summarise_download_stats([{"count": 5, "successes": 5, "status_dict": {"success": 5}},
                                       {"count": 4, "successes": 1, "failed_to_download": 3,
                                        "status_dict": {"success": 1, "HTTP Error 404: File not found": 3}}])
    assert (totals["attempted"], totals["successes"], totals["failed"], totals["failed_to_download"]) == (9, 6, 3, 3)
    assert totals["failed_by_error"] == {"HTTP Error 404: File not found": 3}
