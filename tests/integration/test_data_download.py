"""data_tools/download.py runs img2dataset for real against images served on 127.0.0.1 (no outside
traffic), including URLs that fail, and the shards it writes go through our loader."""
from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest

from ldm_scale import storage
from ldm_scale.data import DataConfig, FilterConfig, build_loader
from ldm_scale.data.synthetic import make_sample
from ldm_scale.dist import DistInfo
from tests.fixtures.torchrun import run_python

pytest.importorskip("img2dataset", reason="CI installs it with the dev extra; pip install 'ldm_scale[img2dataset]'")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield base, rows
    finally:
        server.shutdown()
        server.server_close()


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
    result = run_python(["data_tools/download.py", "--parquet", parquet, "--out", out, "--image-size", "48",
                         "--samples-per-shard", "8", "--threads", "4", "--timeout", "5"], env=env, timeout=300).check()
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
