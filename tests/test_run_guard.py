"""common.run_guard: a fresh run never writes over another run's results; `latest` resumes only the same run."""

import argparse

import pytest
from accelerate import PartialState

from common.checkpoints import STATE_FILE
from common.errors import UserError, configure_logging
from common.run_guard import earlier_results, read_run, resume_recorded_flags, run_identity, start_run, write_run


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
    (folder / STATE_FILE).write_text("{}")
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
    # A checkpoint without a run record (written before run records, or not by this trainer) is not resumed.
    with pytest.raises(UserError, match=r"checkpoint-6: no run record \(run.json\)"):
        start_run(flags(tmp_path, resume="checkpoint-6"), identity)


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


def test_resume_takes_the_flags_not_given_from_the_run_record(tmp_path, caplog):
    """Only the flags typed again are compared; the others (identity paths as resolved) come from the record; `latest`
    into a folder without checkpoints says it starts from step 0."""
    PartialState()
    configure_logging()
    first = flags(tmp_path, rank=8, learning_rate=3e-4, dataset=str(tmp_path))
    identity = run_identity(first, "flux_kontext", 1)
    own = {"run_id": "a" * 32, "identity": identity, "flags": {**vars(first), "quiet": True, "lost_flag": 1}}
    write_run(tmp_path, own)
    checkpoint(tmp_path, 2, own)
    resumed = flags(tmp_path, resume="latest", rank=16, learning_rate=1e-4, dataset="elsewhere", quiet=False)
    taken = resume_recorded_flags(resumed, given={"output_dir", "resume_from_checkpoint", "learning_rate"})
    assert resumed.rank == 8 and resumed.dataset == str(tmp_path.resolve()) and resumed.learning_rate == 1e-4
    assert "rank" in taken and "learning_rate" not in taken and resumed.quiet is False
    assert start_run(resumed, run_identity(resumed, "flux_kontext", 1))[0] == tmp_path / "checkpoint-2"
    again = flags(tmp_path, resume="latest", rank=16)
    resume_recorded_flags(again, given={"rank"})
    with pytest.raises(UserError, match=r"rank: checkpoint 8, now 16.*leave those flags out"):
        start_run(again, run_identity(again, "flux_kontext", 1))

    empty = tmp_path / "empty"
    fresh = flags(empty, resume="latest")
    assert resume_recorded_flags(fresh, given=set()) == []
    with caplog.at_level("INFO"):
        assert start_run(fresh, run_identity(fresh, "flux_kontext", 1))[0] is None
    assert f"no checkpoint in {empty}; starting from step 0" in caplog.text
