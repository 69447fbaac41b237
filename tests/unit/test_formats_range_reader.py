"""The sequential checksum stream behind zip and TF validation."""

from __future__ import annotations

import os
import threading
import zlib

import pytest
from trainsup.checkpoint.range_reader import ShortRead, Stream, checksum_ranges


def _crc(data, crc):
    return zlib.crc32(data, crc)


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 << 20)
    p = tmp_path / "blob"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_ranges_across_chunk_boundaries_match_a_plain_crc(blob):
    fd, data = blob
    ranges = [(5, 1000), (2000, (1 << 20) + 7), (3 << 19, 1), ((3 << 20) - 9, 9), (100, 0)]
    got = checksum_ranges(fd, ranges, _crc)
    assert got == [zlib.crc32(data[o:o + n]) for o, n in ranges]


def test_small_chunks_and_header_reads_from_the_same_stream(blob):
    fd, data = blob
    with Stream(fd, 10, 1 << 20, chunk=4096) as s:
        assert s.read(5000) == data[10:5010]
        s.skip_to(9000)
        assert s.checksum(100000, _crc) == zlib.crc32(data[9000:109000])
        with pytest.raises(ValueError):
            s.skip_to(0)


def test_overlapping_ranges_are_refused(blob):
    fd, _ = blob
    with pytest.raises(ValueError, match="overlap"):
        checksum_ranges(fd, [(0, 100), (50, 100)], _crc)


def test_a_file_shorter_than_its_ranges_is_a_short_read_and_the_reader_thread_ends(blob):
    fd, _ = blob
    before = threading.active_count()
    with pytest.raises(ShortRead):
        checksum_ranges(fd, [(0, 4 << 20)], _crc)
    assert threading.active_count() == before


def test_stopping_early_joins_the_reader(blob):
    fd, _ = blob
    before = threading.active_count()
    with Stream(fd, 0, 3 << 20, chunk=4096) as s:
        s.read(10)
    assert threading.active_count() == before


def test_a_short_file_read_by_the_helper_thread_is_a_short_read(blob):
    fd, _ = blob
    before = threading.active_count()
    with pytest.raises(ShortRead), Stream(fd, 0, 4 << 20, chunk=4096) as s:
        s.checksum(4 << 20, _crc)
    assert threading.active_count() == before
