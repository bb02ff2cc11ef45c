"""common.checkpoints: atomic checkpoint folders, rotation and what --resume_from_checkpoint resolves to."""

import pytest
import torch
from accelerate import Accelerator

from common.checkpoints import checkpoints, remove_partial_checkpoints, resolve_resume, save_checkpoint, step_of


def test_only_finished_checkpoints_count(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".checkpoint-12.tmp", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert resolve_resume(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path / "empty", "latest") is None
    assert step_of(tmp_path / "checkpoint-10") == 10
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        resolve_resume(tmp_path, "checkpoint-7")


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_save_rotates_and_restores_registered_state(tmp_path):
    accelerator = Accelerator(cpu=True)
    counter = Counter()
    optimizer = accelerator.prepare(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    accelerator.register_for_checkpointing(counter)
    for step in (1, 2, 3):
        counter.value = step
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    accelerator.load_state(str(tmp_path / "checkpoint-2"))
    assert counter.value == 2 and optimizer is not None


def test_a_failed_write_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch, caplog):
    accelerator = Accelerator(cpu=True)
    counter = Counter()
    accelerator.prepare(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    accelerator.register_for_checkpointing(counter)
    run = {"run_id": "r", "identity": {}}
    assert save_checkpoint(accelerator, tmp_path, 1, total_limit=1, run=run) == tmp_path / "checkpoint-1"
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoint-1").rglob("*") if p.is_file()}
    assert (tmp_path / "checkpoint-1" / "run.json").is_file()
    save_state = accelerator.save_state

    def disk_full(folder):
        save_state(folder)  # writes part of the state, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    counter.value = 2
    with caplog.at_level("WARNING"):
        assert save_checkpoint(accelerator, tmp_path, 2, total_limit=1, run=run) is None
    assert "could not write checkpoint-2 (OSError: [Errno 28] No space left on device)" in caplog.text
    assert "earlier checkpoints checkpoint-1 are untouched; training continues" in caplog.text
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1"]  # rotation did not delete the good one
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert before == {p: p.read_bytes() for p in (tmp_path / "checkpoint-1").rglob("*") if p.is_file()}
    monkeypatch.setattr(accelerator, "save_state", save_state)
    assert save_checkpoint(accelerator, tmp_path, 3, total_limit=1, run=run) == tmp_path / "checkpoint-3"
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3"]


def test_partial_checkpoints_a_kill_left_are_removed(tmp_path):
    for name in ("checkpoint-2", ".checkpoint-4.tmp", ".checkpoint-6.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    assert remove_partial_checkpoints(tmp_path) == [tmp_path / ".checkpoint-4.tmp", tmp_path / ".checkpoint-6.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert remove_partial_checkpoints(tmp_path / "absent") == []
