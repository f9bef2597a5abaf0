"""The shard tar reader against Python's tarfile: same members for every tar dialect writers produce,
and damaged archives end with the right reason instead of an exception."""
from __future__ import annotations

import gzip
import io
import tarfile
from collections import Counter

import pytest

from ldm_scale.data.tar_stream import _Damage, iter_members, iter_tar_samples

LONG_DIR = "d" * 90 + "/" + "e" * 70  # > 100 characters: ustar prefix field, GNU 'L' or pax 'path'


def _archive(fmt: int, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("shard/", None),
    ("shard/000000.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("shard/000000.txt", b"a red circle"),
    ("shard/000000.json", b"{}"),
    ("shard/000001.jpg", b""),  # empty member
    (LONG_DIR + "/000002.latent.npy", b"x" * 512),  # exactly one block, no padding
    ("shard/caf\u00e9.txt", b"non-ascii name"),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in MEMBERS if not m[0].startswith("shard/caf")]  # ustar names are ASCII here
    else:
        members = MEMBERS
    raw = _archive(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(iter_members(io.BufferedReader(io.BytesIO(raw)))) == expected
    assert len(expected) == len(members) - 1


def test_gzip_shards_and_grouping(tmp_path):
    raw = _archive(tarfile.PAX_FORMAT, MEMBERS)
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(raw))
    counters = Counter()
    samples = list(iter_tar_samples(str(path), 3, counters))
    assert [s["__key__"] for s in samples] == ["shard/000000", "shard/000001", LONG_DIR + "/000002", "shard/caf\u00e9"]
    assert samples[0]["txt"] == b"a red circle" and set(samples[0]) >= {"jpg", "txt", "json"}
    assert samples[2]["latent.npy"] == b"x" * 512 and samples[2]["__index__"] == 2 and samples[2]["__shard__"] == 3
    assert counters["members"] == 6 and not any(k.startswith("skip/") for k in counters)


def _reason(raw: bytes) -> str:
    with pytest.raises(_Damage) as info:
        list(iter_members(io.BytesIO(raw)))
    return info.value.reason


def test_damage_reasons():
    raw = _archive(tarfile.USTAR_FORMAT, MEMBERS[1:3])  # header, 770 data bytes (2 blocks), header, 12 bytes
    second = 512 + 1024
    assert _reason(b"") == "corrupt_tar"
    assert _reason(b"this is not a tar archive at all" * 40) == "corrupt_tar"
    assert _reason(raw[:512 + 100]) == "truncated_member"  # inside the first member's data
    assert _reason(raw[:second + 300]) == "truncated_member"  # inside the second header
    flipped = bytearray(raw)
    flipped[second + 10] ^= 0x41  # the second member's name: its checksum no longer matches
    assert _reason(bytes(flipped)) == "corrupt_tar"
    # a cut anywhere, even in the padding or the closing zero blocks, may have lost members
    assert _reason(raw[:second + 512 + 20]) == "truncated_member"
    assert _reason(raw[:second + 1024]) == "truncated_member"
    assert len(list(iter_members(io.BytesIO(raw[:second + 1024 + 512])))) == 2  # one zero block ends it too


def test_damaged_gzip_is_counted(tmp_path):
    packed = gzip.compress(_archive(tarfile.USTAR_FORMAT, MEMBERS[1:4]) + bytes(4096))
    (tmp_path / "cut.tgz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "bad.tgz").write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    counters = Counter()
    assert list(iter_tar_samples(str(tmp_path / "cut.tgz"), 0, counters)) == []
    assert list(iter_tar_samples(str(tmp_path / "bad.tgz"), 1, counters)) == []
    assert counters["skip/truncated_member"] == 1 and counters["skip/corrupt_tar"] == 1
