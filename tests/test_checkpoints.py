"""common.checkpoints: atomic checkpoint folders, rotation and what --resume_from_checkpoint resolves to."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from common.checkpoints import (
    check_loadable,
    checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
    step_of,
)
from common.errors import UserError


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


class Payload:
    """Unpickling this creates `marker`: the proof that a file was unpickled with code execution allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def adam_run(tmp_path, steps=(1, 2, 3)):
    """An accelerator, an AdamW with real moments, and checkpoints after each step, the loop state as JSON."""
    accelerator = Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = accelerator.prepare(torch.optim.AdamW([param], lr=0.1))
    for step in steps:
        param.grad = torch.full((2,), float(step))
        optimizer.step()
        save_checkpoint(accelerator, tmp_path, step, total_limit=2, state={"step": step, "lr": [0.1 / 3]})
    return accelerator, optimizer


def test_save_rotates_and_restores_the_state_without_pickles(tmp_path):
    accelerator, optimizer = adam_run(tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    saved = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    assert not list(tmp_path.glob("checkpoint-*/custom_checkpoint_*"))
    assert load_checkpoint(accelerator, tmp_path / "checkpoint-2") == {"step": 2, "lr": [0.1 / 3]}
    restored = optimizer.state_dict()["state"][0]
    assert restored["step"] == 2 and not torch.equal(restored["exp_avg"], saved["exp_avg"])
    load_checkpoint(accelerator, tmp_path / "checkpoint-3")
    assert all(torch.equal(optimizer.state_dict()["state"][0][k], v) for k, v in saved.items())


def test_a_planted_pickle_payload_is_never_executed(tmp_path):
    """A checkpoint from elsewhere is data: a payload in accelerate's optimizer or RNG file is not unpickled (one
    error line for the optimizer, the RNG state is skipped), and `register_for_checkpointing`'s pickled custom
    states are refused before anything loads."""
    accelerator, _ = adam_run(tmp_path, steps=(1,))
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "checkpoint-1"
    torch.save(Payload(marker), checkpoint / "random_states_0.pkl")
    assert load_checkpoint(accelerator, checkpoint) == {"step": 1, "lr": [0.1 / 3]}
    torch.save({"state": Payload(marker)}, checkpoint / "optimizer.bin")
    with pytest.raises(UserError, match="optimizer|objects other than tensors"):
        load_checkpoint(accelerator, checkpoint)
    torch.save(Payload(marker), checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(UserError, match=r"pickled state \(custom_checkpoint_0.pkl\)"):
        check_loadable(checkpoint)
    with pytest.raises(UserError, match="custom_checkpoint_0.pkl"):
        load_checkpoint(accelerator, checkpoint)
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    (checkpoint / "training_state.json").unlink()
    with pytest.raises(UserError, match="no training_state.json"):
        check_loadable(checkpoint)
    assert not marker.exists()


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
