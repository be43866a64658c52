"""GradientStore: round trips across shards and dtypes, reads by id / domain, and a writer killed
with SIGKILL in the middle of appending."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mixkernels import GradientStore

ROOT = Path(__file__).resolve().parents[1]


def _block(k: int, b: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randn(b, dim, generator=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_across_shards(tmp_path, dtype):
    store = GradientStore(tmp_path / "s", 24, dtype, shard_rows=7)
    blocks, ids, doms = [], [], []
    for k, b in enumerate([5, 9, 1, 13]):
        x = _block(k, b, 24)
        i = torch.arange(b) * 10 + 1000 * k
        d = [f"dom{(k + j) % 3}" for j in range(b)]
        store.append(x, i, d)
        blocks.append(x.to(dtype))
        ids.append(i)
        doms += d
    all_x, all_ids = torch.cat(blocks), torch.cat(ids)
    assert len(store) == 28 and len(list((tmp_path / "s").glob("*.data"))) == 4

    reopened = GradientStore(tmp_path / "s", 24, dtype)
    assert len(reopened) == 28
    assert torch.equal(reopened.ids(), all_ids)
    perm = torch.randperm(28)
    got = reopened.get(all_ids[perm])
    assert got.dtype == dtype and torch.equal(got, all_x[perm])
    for name in ("dom0", "dom1", "dom2"):
        sel = torch.tensor([d == name for d in doms])
        dom_ids, dom_x = reopened.by_domain(name)
        assert torch.equal(dom_ids, all_ids[sel]) and torch.equal(dom_x, all_x[sel])
    assert reopened.domain_names == ["dom0", "dom1", "dom2"]
    streamed = list(reopened.iter_blocks(rows=4))
    assert torch.equal(torch.cat([s[2] for s in streamed]), all_x)
    assert torch.equal(torch.cat([s[0] for s in streamed]), all_ids)
    # appending to a reopened store continues where it stopped
    reopened.append(_block(9, 3, 24), [1, 2, 3], "dom0")
    assert len(GradientStore(tmp_path / "s", 24, dtype)) == 31


def test_int_domains_and_empty_domain(tmp_path):
    store = GradientStore(tmp_path, 8)
    x = torch.randn(6, 8)
    store.append(x, torch.arange(6), torch.tensor([0, 1, 0, 2, 2, 0]))
    ids, rows = store.by_domain(0)
    assert ids.tolist() == [0, 2, 5] and torch.equal(rows, x[[0, 2, 5]].half())
    ids, rows = store.by_domain(7)
    assert ids.numel() == 0 and rows.shape == (0, 8)
    assert store.domains().tolist() == [0, 1, 0, 2, 2, 0]


def test_bad_inputs(tmp_path):
    store = GradientStore(tmp_path, 8)
    store.append(torch.randn(2, 8), [1, 2], 0)
    with pytest.raises(ValueError, match=r"grads must be a \[B, dim = 8\] tensor"):
        store.append(torch.randn(2, 9), [3, 4], 0)
    with pytest.raises(ValueError, match="ids already stored: \\[2\\]"):
        store.append(torch.randn(2, 8), [3, 2], 0)
    with pytest.raises(ValueError, match="duplicates within the block"):
        store.append(torch.randn(2, 8), [5, 5], 0)
    with pytest.raises(ValueError, match="domains must have B = 2 labels, got 3"):
        store.append(torch.randn(2, 8), [5, 6], [0, 1, 2])
    with pytest.raises(ValueError, match="holds int domain labels, got str"):
        store.append(torch.randn(2, 8), [5, 6], "a")
    with pytest.raises(ValueError, match="holds dim=8 dtype=float16, but dim=4 dtype=float16"):
        GradientStore(tmp_path, 4)
    with pytest.raises(KeyError, match="ids not stored: \\[99\\]"):
        store.get([1, 99])
    assert len(GradientStore(tmp_path, 8)) == 2  # failed appends committed nothing


_WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from mixkernels import GradientStore
    store = GradientStore({path!r}, 257, torch.float16, shard_rows=300)
    k = len(store) // 40
    while True:
        g = torch.Generator().manual_seed(1000 + k)
        store.append(torch.randn(40, 257, generator=g), torch.arange(40) + 40 * k, k % 3)
        print("COMMITTED", k, flush=True)
        k += 1
    """
)


def _run_writer_and_kill(path: Path, commits: int) -> int:
    script = _WRITER.format(root=str(ROOT), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MIXKERNELS_DISABLE_EXT": "1"})
    last = -1
    try:
        for line in proc.stdout:
            last = int(line.split()[1])
            if last >= commits:
                time.sleep(0.003 * (commits % 5))  # land somewhere inside a later append
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return last


def test_killed_writer_never_corrupts_committed_data(tmp_path):
    path = tmp_path / "store"
    first = _run_writer_and_kill(path, 12)
    second = _run_writer_and_kill(path, first + 6)  # a second writer resumes after the crash
    store = GradientStore(path, 257, torch.float16)
    n_blocks = len(store) // 40
    assert len(store) % 40 == 0 and n_blocks >= second + 1
    ids = store.ids()
    assert torch.equal(ids, torch.arange(40 * n_blocks))
    for k in range(n_blocks):
        expected = torch.randn(40, 257, generator=torch.Generator().manual_seed(1000 + k)).half()
        assert torch.equal(store.get(range(40 * k, 40 * k + 40)), expected), k
    assert store.domains().tolist() == [k % 3 for k in range(n_blocks) for _ in range(40)]
