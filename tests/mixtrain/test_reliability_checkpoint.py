"""Manifests, verification, fallback selection, `verify`, and full-disk saves and exports
(in-process: a stand-in engine that writes like DeepSpeed, a tiny real HF model for the export)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from _diskfull import install as disk_full

from mixtrain.__main__ import main as cli
from mixtrain.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    find_resumable,
    save_checkpoint,
    verify_dir,
    write_manifest,
)


class FakeEngine:
    """Writes what DeepSpeed's engine.save_checkpoint writes for one rank (torch.save files)."""

    def __init__(self, seed: int) -> None:
        self.w = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))

    def save_checkpoint(self, path: str, tag: str, save_latest: bool) -> None:
        d = Path(path) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.w}, str(d / "mp_rank_00_model_states.pt"))
        torch.save({"optimizer": self.w * 2}, str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def _save(root: Path, step: int, seed: int = 0, keep: int = 3) -> Path:
    return save_checkpoint(FakeEngine(seed), root, step, {"step": step, "note": "x"}, rank=0, keep=keep)


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    cp = _save(tmp_path / "checkpoints", 2)
    manifest = json.loads((cp / MANIFEST_FILE).read_text())
    files = sorted(p.relative_to(cp).as_posix() for p in cp.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == files == [
        "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "mixtrain_state.json",
        "rng-rank0.safetensors"]
    for rel, entry in manifest["files"].items():
        data = (cp / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    v = verify_dir(cp)
    assert v.ok and v.verified and v.files == 4 and v.size == sum(e["size"] for e in manifest["files"].values())


@pytest.mark.parametrize("damage, problem", [
    ("flip", r"ds/mp_rank_00_model_states\.pt: sha256 differs from the manifest \(corrupt\)"),
    ("truncate", r"ds/mp_rank_00_model_states\.pt: 100 bytes, the manifest says \d+ \(truncated or overwritten\)"),
    ("delete", r"ds/mp_rank_00_model_states\.pt: missing"),
    ("manifest", r"manifest\.json: unreadable manifest \(UnicodeDecodeError"),
    ("escape", r"manifest\.json: entry '\.\./outside' points outside the directory"),
])
def test_verify_names_the_first_bad_file(tmp_path, damage, problem):
    cp = _save(tmp_path, 2)
    f = cp / "ds" / "mp_rank_00_model_states.pt"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        f.unlink()
    elif damage == "manifest":
        (cp / MANIFEST_FILE).write_bytes(b"\xbe\x00garbage")
    else:
        m = json.loads((cp / MANIFEST_FILE).read_text())
        m["files"] = {"../outside": {"size": 1, "sha256": "0" * 64}, **m["files"]}
        (cp / MANIFEST_FILE).write_text(json.dumps(m))
    v = verify_dir(cp)
    assert not v.ok and not v.verified
    assert v.problem.startswith(str(cp))
    assert re.search(problem, v.problem), v.problem


def test_fallback_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        _save(root, s, seed=s)
    (root / "step-00000006" / "mixtrain_state.json").write_bytes(b"\xbe\xef random bytes")
    with caplog.at_level(logging.WARNING, logger="mixtrain"):
        found, tried = find_resumable(root)
    assert found == root / "step-00000004"
    assert [v.path.name for v in tried] == ["step-00000006"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"checkpoint {root / 'step-00000006'} is unusable: {root / 'step-00000006'}/mixtrain_state")


def test_pruning_after_a_fallback_keeps_the_good_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (4, 6):
        _save(root, s, seed=s, keep=1)
    assert [p.name for p in root.iterdir()] == ["step-00000006"]
    (root / "step-00000006" / "mixtrain_state.json").write_bytes(b"\xbe")
    _save(root, 5, keep=1)  # resumed from an older checkpoint, saving again below the corrupt one
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005", "step-00000006"]
    assert find_resumable(root)[0] == root / "step-00000005"


def test_no_checkpoint_verifies_one_error_lists_every_try(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4):
        _save(root, s, seed=s)
    (root / "step-00000004" / "ds" / "mp_rank_00_model_states.pt").unlink()
    (root / "step-00000002" / "rng-rank0.safetensors").write_bytes(b"")
    (root / "step-00000009").mkdir()  # an empty directory named like a checkpoint
    with pytest.raises(CheckpointError) as e:
        find_resumable(root)
    lines = str(e.value).splitlines()
    assert lines[0] == f"no usable checkpoint under {root}; tried, newest first:"
    assert lines[1].startswith("  step-00000009: ") and "mixtrain_state.json: missing" in lines[1]
    assert lines[2].startswith("  step-00000004: ") and "mp_rank_00_model_states.pt: missing" in lines[2]
    assert lines[3].startswith("  step-00000002: ") and "rng-rank0.safetensors: 0 bytes" in lines[3]
    assert find_resumable(tmp_path / "nothing") == (None, [])


def test_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    cp = _save(root, 2)
    (cp / MANIFEST_FILE).unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="mixtrain"):
        assert find_resumable(root) == (cp, [])
    assert "no manifest.json (written by an older mixtrain); its files cannot be verified" in caplog.text
    (cp / "mixtrain_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-00000002: .*mixtrain_state\.json: corrupt state file"):
        find_resumable(root)


# the stand-in's files: model states 18201 bytes, optimizer states 18306, RNG state 5128
@pytest.mark.parametrize("budget, failing", [(2_000, "ds/mp_rank_00_model_states.pt"),
                                             (20_000, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                             (38_000, "rng-rank0.safetensors")])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, budget, failing):
    root = tmp_path / "checkpoints"
    prev = _save(root, 2, seed=1)
    before = {p: p.read_bytes() for p in prev.rglob("*") if p.is_file()}
    undo = disk_full(".tmp-step-00000004", budget)
    try:
        with pytest.raises(CheckpointError) as e:
            _save(root, 4, seed=2)
    finally:
        undo()
    msg = str(e.value)
    assert msg.startswith(f"could not write the checkpoint of step 4: {root / '.tmp-step-00000004' / failing}: "
                          "No space left on device; its partial files were removed"), msg
    assert msg.endswith("the previous checkpoint(s) step-00000002 are intact")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert {p: p.read_bytes() for p in prev.rglob("*") if p.is_file()} == before
    assert verify_dir(prev).verified


def test_full_disk_while_writing_the_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    undo = disk_full(f".tmp-step-00000004/.{MANIFEST_FILE}", 100)  # 609 bytes: fails midway
    try:
        with pytest.raises(CheckpointError, match=r"manifest\.json\.tmp-\d+: No space left on device"):
            _save(root, 4)
    finally:
        undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_verify_command_lines_and_exit_codes(tmp_path, capsys):
    run = tmp_path / "run"
    for s in (2, 4):
        _save(run / "checkpoints", s, seed=s)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    write_manifest(run / "model", "model")
    assert cli(["verify", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok          checkpoints/step-00000002 (4 files, ")
    assert out[2] == "ok          model (1 files, 2 bytes, sha256 match)"
    assert out[3] == "3 of 3 usable"
    (run / "model" / "config.json").write_text("[]")  # same size, other bytes
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2] == f"BAD         model: {run / 'model' / 'config.json'}: sha256 differs from the manifest (corrupt)"
    assert out[3] == "2 of 3 usable; 1 bad"
    assert cli(["verify", str(tmp_path / "missing")]) == 2


def _tiny_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_full_disk_during_an_export_keeps_the_previous_model(tmp_path):
    from safetensors.torch import load_file

    from mixtrain.data import ByteTokenizer
    from mixtrain.export import ExportError, export_model

    out = tmp_path / "run"
    first = _tiny_model(0)
    export_model(first, ByteTokenizer(), out, rank=0)
    assert verify_dir(out / "model").verified
    weights = load_file(str(out / "model" / "model.safetensors"))
    undo = disk_full(".tmp-model", 30_000)
    try:
        with pytest.raises(ExportError) as e:
            export_model(_tiny_model(1), ByteTokenizer(), out, rank=0)
    finally:
        undo()
    assert str(e.value) == (f"could not export the model: {out / '.tmp-model' / 'model.safetensors'}: No space left "
                            "on device; its partial files were removed, the previous export is intact")
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    assert verify_dir(out / "model").verified
    again = load_file(str(out / "model" / "model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    export_model(_tiny_model(1), ByteTokenizer(), out, rank=0)  # with room again, the new model replaces it
    assert verify_dir(out / "model").verified
    new = load_file(str(out / "model" / "model.safetensors"))
    assert not torch.equal(new["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
