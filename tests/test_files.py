"""sft_core/files.py: a file's sha256, computed once per path, size and mtime, and bytes a reader hands over."""

from __future__ import annotations

import hashlib
import os

import pytest

from sft_core.files import content_sha256, remember


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_content_sha256_is_hashlibs_sha256_of_the_bytes(tmp_path):
    small = tmp_path / "rows.jsonl"
    small.write_bytes(b'{"question": "q"}\n')
    assert content_sha256(small) == _sha(b'{"question": "q"}\n')
    big = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # read in 1 MiB chunks
    big.write_bytes(data)
    assert content_sha256(big) == _sha(data)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert content_sha256(empty) == _sha(b"")


def test_a_file_that_cannot_be_read_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        content_sha256(tmp_path / "missing.jsonl")


def test_remember_hands_back_the_bytes_and_the_next_hash_uses_them_without_reading(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"on disk")
    told = b"what the reader says it read"
    assert remember(path, told) is told
    assert content_sha256(path) == _sha(told), "keyed by path, size and mtime: the file is not read again"


def test_a_remembered_hash_is_dropped_once_the_file_changes(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"version 1")
    remember(path, b"version 1")
    path.write_bytes(b"version 2, longer")
    assert content_sha256(path) == _sha(b"version 2, longer"), "another size"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    remember(path, b"stale")
    assert content_sha256(path) == _sha(b"stale")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert content_sha256(path) == _sha(b"version 2, longer"), "another mtime, same size: read again"


def test_a_hash_is_computed_once_for_a_path_size_and_mtime(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"aaaa")
    first = content_sha256(path)
    st = path.stat()
    path.write_bytes(b"bbbb")  # same size, then the same mtime: the stamp says unchanged
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_sha256(path) == first == _sha(b"aaaa")


def test_a_path_is_keyed_by_the_file_it_resolves_to(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_bytes(b"rows")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    remember(link, b"read through the link")
    assert content_sha256(target) == _sha(b"read through the link")
    relative = tmp_path / "sub" / ".." / "rows.jsonl"
    (tmp_path / "sub").mkdir()
    assert content_sha256(relative) == _sha(b"read through the link")
