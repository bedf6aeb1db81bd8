"""The CPU decode kernels' build: cached by source, compiler and CPU; written atomically; refused cleanly."""

import logging
import os

import pytest
import torch

from nexus.base import mxfp4, native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_STATE", {})
    return tmp_path / "cache" / "native"


def test_builds_once_into_the_cache_and_keeps_the_umask(fresh, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    old = os.umask(0o027)
    try:
        lib = native.library()
    finally:
        os.umask(old)
    assert lib is not None
    (so,) = fresh.iterdir()  # one file, no temporary left behind
    assert so.name.startswith("decode-") and so.suffix == ".so"
    assert so.stat().st_mode & 0o777 == 0o750
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt a cached kernel"))
    assert native.library() is not None


def test_a_failing_compiler_falls_back_to_numpy(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="nexus.base.native"):
        assert native.library() is None
    assert "could not compile the CPU decode kernels" in caplog.text and "decoding with numpy" in caplog.text
    assert not fresh.exists() or not any(fresh.iterdir())  # nothing half-written
    blocks = torch.randint(0, 256, (3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scales = torch.tensor([120, 127, 255], dtype=torch.uint8)
    assert mxfp4.decode(blocks, scales).shape == (96,)  # still decodes


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("NEXUS_NATIVE", "0")
    assert native.library() is None
    assert not fresh.exists()
