"""common.run_guard: a fresh run never writes over another run's results; `latest` resumes only the same run."""

import argparse

import pytest

from common.errors import UserError
from common.run_guard import earlier_results, read_run, run_identity, start_run, write_run


def flags(out, resume=None, **changes):
    values = dict(
        output_dir=str(out), resume_from_checkpoint=resume, pretrained_model_name_or_path="m", revision=None,
        rank=4, lora_alpha=4.0, lora_target_modules=["to_q"], seed=0, train_batch_size=2,
        gradient_accumulation_steps=1, group_by_length=False, dataset="d", cache_dir=None,
    )  # fmt: skip
    return argparse.Namespace(**{**values, **changes})


def checkpoint(out, step, run):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if run is not None:
        write_run(folder, run)
    return folder


def test_fresh_run_into_a_used_folder_is_refused_naming_how_to_resume(tmp_path):
    args = flags(tmp_path)
    assert earlier_results(tmp_path) == []
    resume, run = start_run(args, run_identity(args, "flux_kontext", 1))
    assert resume is None and len(run["run_id"]) == 32
    (tmp_path / "metrics.jsonl").write_text("")  # an empty record is no result
    assert earlier_results(tmp_path) == []
    checkpoint(tmp_path, 2, run)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert earlier_results(tmp_path) == ["checkpoint-2", "pytorch_lora_weights.safetensors"]
    with pytest.raises(UserError, match=r"checkpoint-2, pytorch_lora_weights.*--resume_from_checkpoint latest"):
        start_run(args, run_identity(args, "flux_kontext", 1))


def test_latest_resumes_only_checkpoints_of_the_run_that_owns_the_folder(tmp_path):
    args = flags(tmp_path, resume="latest")
    identity = run_identity(args, "flux_kontext", 1)
    own = {"run_id": "a" * 32, "identity": identity}
    write_run(tmp_path, own)
    checkpoint(tmp_path, 2, own)
    checkpoint(tmp_path, 4, {"run_id": "b" * 32, "identity": identity})  # another run's, newer
    checkpoint(tmp_path, 6, None)  # written before run identities existed
    resume, run = start_run(args, identity)
    assert resume == tmp_path / "checkpoint-2" and run["run_id"] == "a" * 32
    assert read_run(tmp_path)["run_id"] == "a" * 32
    # An explicit path still resumes an old checkpoint without identity, as a new run id.
    resume, run = start_run(flags(tmp_path, resume="checkpoint-6"), identity)
    assert resume == tmp_path / "checkpoint-6" and run["run_id"] != "a" * 32


def test_resuming_with_other_run_settings_is_refused_naming_them(tmp_path):
    args = flags(tmp_path, resume="latest")
    own = {"run_id": "a" * 32, "identity": run_identity(args, "flux_kontext", 1)}
    write_run(tmp_path, own)
    checkpoint(tmp_path, 2, own)
    changed = flags(tmp_path, resume="latest", rank=8, learning_rate=1.0)
    with pytest.raises(UserError, match=r"rank: checkpoint 4, now 8"):
        start_run(changed, run_identity(changed, "flux_kontext", 1))
    with pytest.raises(UserError, match=r"num_processes: checkpoint 1, now 2"):
        start_run(args, run_identity(args, "flux_kontext", 2))
    with pytest.raises(UserError, match="no such checkpoint"):
        start_run(flags(tmp_path, resume="checkpoint-9"), own["identity"])
