"""The lab reads kernel images within bounds: a bzImage payload that inflates past the limit (or a
decompression bomb) is not held in memory; the lab then boots the compressed image as it is."""

from __future__ import annotations

import gzip
import lzma
import subprocess

import pytest

import kenv
from kpipe.lab import kernel

ELF_LIKE = b"\x7fELF" + bytes(range(256)) * 64


def _compress(fmt: str, data: bytes) -> bytes:
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if fmt == "gzip":
        return gzip.compress(data)
    return subprocess.run([kenv.require_tool("zstd"), "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("fmt", ["xz", "gzip", "zstd"])
def test_a_payload_within_the_limit_inflates(fmt):
    assert kernel._decompress(fmt, _compress(fmt, ELF_LIKE), limit=len(ELF_LIKE)) == ELF_LIKE


@pytest.mark.parametrize("fmt", ["xz", "gzip", "zstd"])
def test_a_payload_past_the_limit_is_refused_not_inflated(fmt):
    bomb = _compress(fmt, b"\0" * (8 << 20))
    assert kernel._decompress(fmt, bomb, limit=1 << 20) is None


def test_the_default_limit_holds_a_real_kernel_image():
    # Debian's and the forge's kernels inflate to 30-80 MB: far below the bound, far above a bomb's start
    assert 128 << 20 <= kernel.MAX_KERNEL_IMAGE_BYTES <= 1 << 30
