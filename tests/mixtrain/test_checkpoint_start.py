"""Checkpoint selection (atomic commit) and start-up refusals."""

from __future__ import annotations

import pytest

from mixtrain import policies
from mixtrain.checkpoint import latest_checkpoint, list_checkpoints
from mixtrain.config import ConfigError, demo_config, from_dict
from mixtrain.data.collate import EncodedDomain
from mixtrain.loop import _check_start


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-00000002", True), ("step-00000004", True), (".tmp-step-00000006", True),
                           ("step-00000008", False)]:
        d = root / name
        (d / "ds").mkdir(parents=True)
        if complete:
            (d / "mixtrain_state.json").write_text("{}")
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    assert latest_checkpoint(root).name == "step-00000004"
    assert latest_checkpoint(tmp_path / "none") is None


@policies.register("_test_needs_dev")
class NeedsDev(policies.MixingPolicy):
    required_signals = frozenset({"dev_domain_loss"})


def test_policy_needing_dev_refused_at_start():
    cfg = from_dict(demo_config())
    enc = [EncodedDomain("a", [([1, 2], [1, 2])], [([1, 2], [1, 2])], []),
           EncodedDomain("b", [([1, 2], [1, 2])], [], [])]
    cfg.mixing.policy = "_test_needs_dev"
    with pytest.raises(ConfigError, match=r"needs dev losses but domain\(s\) \['b'\] have no dev split"):
        _check_start(cfg, policies.get("_test_needs_dev"), enc)
    _check_start(cfg, policies.get("uniform"), enc)  # static policies do not need dev data


def test_metrics_file_restarts_at_step_zero_and_keeps_up_to_the_resume_step(tmp_path):
    """A run resumed at step k keeps the records up to k (the step-0 evaluation included); a run
    starting from step 0 (killed before its first checkpoint) starts the file afresh."""
    import json

    from mixtrain.loop import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (0, 1, 2, 3)]
    path.write_text("\n".join(lines) + "\n")
    MetricsWriter(tmp_path, True, resume_step=2, tensorboard=False).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    MetricsWriter(tmp_path, True, resume_step=0, tensorboard=False).close()
    assert path.read_text() == ""
