"""Checkpoint readers (hf_tempbalance.checkpoint_files): blocks equal slices of the saved
tensors, and the mapped pages of a ``.bin`` shard do not pile up in the resident set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_tempbalance import checkpoint_files
from hf_tempbalance.checkpoint_files import (
    BIN_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    open_checkpoint,
)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(37, 23, generator=gen).to(torch.bfloat16),
            "b.weight": torch.randn(5, 19, 11, generator=gen),  # a stack of 5 matrices
            "c.bias": torch.randn(23, generator=gen)}


def _write(layout, path, tensors):
    if layout == SAFETENSORS_FILE:
        save_file(tensors, str(path / layout))
    elif layout == BIN_FILE:
        torch.save(tensors, path / layout)
    else:
        suffix = ".safetensors" if layout == SAFETENSORS_INDEX else ".bin"
        weight_map = {}
        for i, (key, tensor) in enumerate(tensors.items()):
            name = f"part-{i}{suffix}"
            if suffix == ".safetensors":
                save_file({key: tensor}, str(path / name))
            else:
                torch.save({key: tensor}, path / name)
            weight_map[key] = name
        (path / layout).write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", checkpoint_files.LAYOUTS)
def test_blocks_are_slices_of_the_saved_tensors(layout, tmp_path):
    tensors = _tensors()
    _write(layout, tmp_path, tensors)
    files = open_checkpoint(tmp_path)
    assert files.layout == layout
    assert {k: (i.dtype, i.shape) for k, i in files.tensors.items()} == \
        {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    for key, tensor in tensors.items():
        assert torch.equal(files.read(key), tensor)
    a = tensors["a.weight"]
    assert torch.equal(files.read_block("a.weight", None, 0, 3, 17), a[3:17])
    assert torch.equal(files.read_block("a.weight", None, 1, 4, 9), a[:, 4:9])
    b = tensors["b.weight"]
    assert torch.equal(files.read_block("b.weight", 3, 0, 2, 11), b[3, 2:11])
    assert torch.equal(files.read_block("b.weight", 4, 1, 0, 7), b[4, :, 0:7])
    block = files.read_block("b.weight", 2, 1, 5, 8)
    assert block.is_contiguous() and block.dtype == b.dtype


def _rss_file_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("release", [True, False])
def test_bin_blocks_do_not_stay_resident(release, tmp_path, monkeypatch):
    """Reading a 32 MiB weight of a mapped .bin in 2 MiB blocks leaves at most a few MiB of it
    resident; without the release the whole weight would be (the control case)."""
    if checkpoint_files._madvise is None:
        pytest.skip("no madvise here")
    if not release:
        monkeypatch.setattr(checkpoint_files, "_release", lambda view: None)
    torch.save({"w": torch.randn(4096, 2048)}, tmp_path / BIN_FILE)
    files = open_checkpoint(tmp_path)
    before = _rss_file_kib()
    total = 0.0
    for lo in range(0, 4096, 256):
        total += float(files.read_block("w", None, 0, lo, lo + 256).sum())
    grown = (_rss_file_kib() - before) / 1024
    files.close()
    if release:
        assert grown < 6, grown
    else:
        assert grown > 24, grown

