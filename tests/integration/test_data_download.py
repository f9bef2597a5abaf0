"""data_tools/download.py runs img2dataset for real against images served on 127.0.0.1 (no outside
traffic), including URLs that fail, and the shards it writes go through our loader; the input's
extra columns reach each sample's JSON (``extra_columns=`` chooses), and
data_tools/inspect_shards.py reports the failed downloads from img2dataset's stats files."""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
from collections import Counter

import pytest

from ldm_scale import storage
from ldm_scale.data import DataConfig, FilterConfig, build_loader
from ldm_scale.data.filters import check_sample
from ldm_scale.data.synthetic import make_sample
from ldm_scale.data.tar_stream import iter_tar_samples
from ldm_scale.dist import DistInfo
from tests.fixtures.torchrun import run_python

pytest.importorskip("img2dataset", reason="CI installs it with the dev extra; pip install 'ldm_scale[img2dataset]'")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(root):
    """``http.server`` on 127.0.0.1 (a free port) serving ``root``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def image_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    rows = []
    for i in range(12):
        _, caption, jpg, meta = make_sample(0, i, min_size=40, max_size=64)
        (root / f"img{i}.jpg").write_bytes(jpg)
        rows.append({"caption": caption, "punsafe": meta["punsafe"], "aesthetic": 3.0 + i * 0.5,
                     "similarity": meta["similarity"], "file": f"img{i}.jpg"})
    for i in range(3):  # not served: 404
        rows.append({"caption": f"missing {i}", "punsafe": 0.0, "aesthetic": 5.0, "similarity": 0.3,
                     "file": f"missing{i}.jpg"})
    with _serving(root) as base:
        yield base, rows


def _write_parquet(path: str, base: str, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"url": f"{base}/{r.pop('file')}", **r} for r in rows])
    pq.write_table(table, path)


@pytest.mark.slow  # img2dataset's imports alone take ~6 s of CPU, twice (it runs a worker process)
@pytest.mark.parametrize("target", ["s3"])  # local output is the same fsspec path; verified by hand, see docs/data.md
def test_download_builds_loadable_shards(image_server, tmp_path, target, request):
    base, rows = image_server
    parquet = str(tmp_path / "part0.parquet")
    _write_parquet(parquet, base, rows)
    env = {"NO_ALBUMENTATIONS_UPDATE": "1"}
    if target == "s3":
        s3 = request.getfixturevalue("s3_server")
        out = s3.url("laion")
        env.update(s3.env)
    else:
        out = str(tmp_path / "shards")
    result = run_python(["data_tools/download.py", f"parquet={parquet}", f"out={out}", "image_size=48",
                         "samples_per_shard=8", "threads=4", "timeout_s=5"], env=env, timeout=300).check()
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    assert totals["successes"] == 12 and totals["failed"] == 3
    sizes = json.loads(storage.read_text(storage.join(out, "sizes.json")))
    assert sum(sizes.values()) == 12

    urls = storage.join(out, "{00000..%05d}.tar" % (len(sizes) - 1))
    cfg = DataConfig(urls=[urls], resolution=32, num_workers=0, shuffle_buffer=0,
                     filters=FilterConfig(min_aesthetic=5.0))
    loader = build_loader(cfg, DistInfo(), batch_size=1, seed=0)
    captions = [c for batch in loader for c in batch["caption"]]
    metrics = loader.metrics()
    # aesthetic 3.0, 3.5, 4.0, 4.5 fail (img2dataset kept the column); the epoch refills from the rest
    assert metrics["filter/min_aesthetic"] >= 4
    kept = {r["caption"] for r in rows[:12] if r["aesthetic"] >= 5.0}
    assert set(captions) == kept and len(captions) == loader.batches_per_epoch == 12


# ------------------------------------------------------------------ extra columns, failed downloads
N_IMAGES, N_MISSING = 10, 2


@pytest.fixture(scope="module")
def labelled_download(tmp_path_factory):
    """One real download to a local directory of a parquet with extra columns (``label``, ``source``,
    ``aesthetic`` and a ``width`` column, a name img2dataset reserves) and 2 URLs that answer 404;
    then ``extra_columns=aesthetic`` of the same input. Yields (rows, totals, out, totals_aesthetic,
    out_aesthetic)."""
    tmp = tmp_path_factory.mktemp("labelled")
    www = tmp / "www"
    www.mkdir()
    rows = []
    for i in range(N_IMAGES):
        _, caption, jpg, _ = make_sample(1, i, min_size=40, max_size=64)
        (www / f"img{i}.jpg").write_bytes(jpg)
        rows.append({"caption": f"{caption} #{i}", "label": i % 3, "source": f"scan-{i:03d}", "aesthetic": 4.0 + i,
                     "width": -1, "file": f"img{i}.jpg"})
    for i in range(N_MISSING):
        rows.append({"caption": f"missing {i}", "label": 9, "source": "gone", "aesthetic": 1.0, "width": -1,
                     "file": f"missing{i}.jpg"})
    env = {"NO_ALBUMENTATIONS_UPDATE": "1"}
    with _serving(www) as base:
        parquet = str(tmp / "part0.parquet")
        _write_parquet(parquet, base, [dict(r) for r in rows])
        common = [f"parquet={parquet}", "image_size=48", "samples_per_shard=5", "threads=4", "timeout_s=5"]
        out = str(tmp / "shards")
        run = run_python(["data_tools/download.py", *common, f"out={out}"], env=env, timeout=300).check()
        out_a = str(tmp / "shards_aesthetic")
        run_a = run_python(["data_tools/download.py", *common, f"out={out_a}", "extra_columns=aesthetic"],
                           env=env, timeout=300).check()
    last = lambda r: json.loads(r.stdout.strip().splitlines()[-1])  # noqa: E731
    yield rows, last(run), out, last(run_a), out_a


def _samples(out):
    """Every sample of the shards under ``out`` as the loader's reader and checks see it."""
    cfg = DataConfig(urls=[out + "/*.tar"], conditioning="text", resolution=32)
    samples = []
    for url in storage.expand_urls(out + "/*.tar"):
        for raw in iter_tar_samples(url, 0, Counter()):
            assert check_sample(raw, cfg) is None
            samples.append(raw)
    return samples


@pytest.mark.slow  # two img2dataset runs (~6 s of imports each)
def test_extra_columns_reach_each_sample_and_the_flag_chooses(labelled_download):
    rows, totals, out, totals_a, out_a = labelled_download
    assert totals["extra_columns"] == ["label", "source", "aesthetic"]  # not url / caption / width
    by_caption = {r["caption"]: r for r in rows}
    samples = _samples(out)
    assert len(samples) == N_IMAGES
    for raw in samples:
        meta = json.loads(raw["json"])  # the .json member, as written by img2dataset
        row = by_caption[raw["caption"]]
        assert (meta["label"], meta["source"], meta["aesthetic"]) == (row["label"], row["source"], row["aesthetic"])
        assert raw["meta"]["label"] == row["label"]  # what the loader's checks parsed (``raw["meta"]``)
        assert meta["width"] > 0  # img2dataset's own field, not the input's -1
    assert totals_a["extra_columns"] == ["aesthetic"]
    samples_a = _samples(out_a)
    assert len(samples_a) == N_IMAGES
    for raw in samples_a:
        assert raw["meta"]["aesthetic"] == by_caption[raw["caption"]]["aesthetic"]
        assert "label" not in raw["meta"] and "source" not in raw["meta"]


@pytest.mark.slow
def test_download_and_inspect_report_failed_downloads(labelled_download, tmp_path):
    _, totals, out, _, _ = labelled_download
    assert (totals["attempted"], totals["successes"], totals["failed"]) == (N_IMAGES + N_MISSING, N_IMAGES, N_MISSING)
    (error, count), = totals["failed_by_error"].items()
    assert "404" in error and count == N_MISSING
    report_url = str(tmp_path / "report.json")
    result = run_python(["data_tools/inspect_shards.py", f"data={out}/*.tar", "write_sizes=false", f"report={report_url}"],
                        timeout=120).check()
    summary = json.loads(result.stdout)
    downloads = summary["downloads"]
    assert summary["num_samples"] == N_IMAGES and summary["status"] == {"success": N_IMAGES}
    assert downloads["stats_files"] == summary["num_shards"] and downloads["shards_without_stats"] == 0
    assert (downloads["attempted"], downloads["successes"], downloads["failed"]) == (N_IMAGES + N_MISSING, N_IMAGES,
                                                                                     N_MISSING)
    assert downloads["failed_by_error"] == totals["failed_by_error"]
    assert downloads["status"]["success"] == N_IMAGES and downloads["shards_differing_from_stats"] == []
    assert f"{N_IMAGES + N_MISSING} attempted, {N_IMAGES} written, {N_MISSING} failed ({error}: {N_MISSING})" \
        in result.stderr
    report = json.loads(storage.read_text(report_url))
    assert report["downloads"] == downloads
    assert sum(s["download_stats"]["count"] for s in report["shards"]) == N_IMAGES + N_MISSING
