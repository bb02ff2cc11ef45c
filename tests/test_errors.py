"""User mistakes end as one line before any weights load; earlier results are never touched; INFO lines show.

Real subprocesses of the training scripts on the tiny kit. An audit hook (`sys.addaudithook`, event "open")
records every file the script opens under the model folder, so "before any model file is opened" is observed,
not inferred; the first case shows the hook does see the model files of a run that gets that far.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trainer_harness as h

from common.errors import UserError

MODEL = "flux_kontext"
# Runs scripts as __main__, one after another in one process (each case: a script and its arguments, JSON in argv[1]),
# with an audit hook printing each opened file under the MODEL_DIR folders (os.pathsep-separated) to stderr; each
# case's lines end with its exit status. One process for several refusals saves the ~12 s of imports each would cost.
AUDITED = """
import json, os, runpy, sys
roots = tuple(os.environ["MODEL_DIR"].split(os.pathsep))
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]).startswith(roots):
        sys.stderr.write(f"AUDIT-OPEN {os.fsdecode(args[0])}\\n")
sys.addaudithook(hook)
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = 0 if exit.code is None else exit.code
    sys.stderr.write(f"AUDIT-EXIT {status}\\n")
"""


def audited_runs(checkpoints, cases, env=None):
    """[(exit status, stderr lines)] of each case (script name, arguments), run in turn in one process with the audit
    hook on the `checkpoints` folders (`env`: the environment, default the harness's)."""
    env = {**(h.ENV if env is None else env), "PYTHONPATH": str(h.ROOT)}
    env["MODEL_DIR"] = os.pathsep.join(str(checkpoint) for checkpoint in checkpoints)
    argvs = [[str(h.ROOT / script), *argv] for script, argv in cases]
    result = subprocess.run(
        [sys.executable, "-c", AUDITED, json.dumps(argvs)], cwd=h.ROOT, env=env, capture_output=True, text=True
    )
    runs, lines = [], []
    for line in result.stderr.splitlines():
        if line.startswith("AUDIT-EXIT "):
            runs.append((int(line.removeprefix("AUDIT-EXIT ")), lines))
            lines = []
        else:
            lines.append(line)
    assert len(runs) == len(cases), result.stderr[-3000:]  # a crash of the process itself ends the cases early
    return runs


def audited_run(checkpoint, argv, script="train_flux_kontext.py", env=None):
    """(exit status, stderr lines) of one script run with the audit hook on `checkpoint`."""
    (run,) = audited_runs([checkpoint], [(script, argv)], env)
    return run


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_error_lines(lines):
    """The output of a refused run: exactly one error line, no traceback, no model file opened (model_index.json,
    which names the checkpoint's pipeline, is read to check it is the script's model)."""
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    opened = [line for line in lines if line.startswith("AUDIT-OPEN") and not line.endswith("/model_index.json")]
    assert not opened, f"a model file was opened: {opened}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, "\n".join(lines)
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("errors")
    checkpoint = tiny_checkpoint(MODEL)
    flags = h.data_flags(MODEL, checkpoint, h.dataset(root, MODEL, rows=4))
    return root, checkpoint, flags


class Payload:
    """Unpickling this creates `marker`: the proof that a file was unpickled with code execution allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_used_output_dir_is_refused_untouched_and_latest_resumes_the_same_run(setup):
    """Also: W&B (offline) writes under --output_dir; checkpoints hold no pickled object; a resume needs only the
    folder (the run's flags come from its record) and unpickles nothing planted in the checkpoint."""
    root, checkpoint, flags = setup
    out = root / "out"
    argv = [*flags, *h.train_flags(out, "--max_train_steps", "2", "--checkpointing_steps", "1")]
    env = {k: v for k, v in h.ENV.items() if k != "WANDB_DIR"}  # W&B's default place: the output folder
    status, lines = audited_run(checkpoint, [*argv, "--report_to", "wandb"], env=env)
    assert status == 0, "\n".join(lines[-30:])
    assert any(line.startswith("AUDIT-OPEN") for line in lines), "the hook must see the model files being read"
    info = [line for line in lines if line.startswith("INFO ")]
    for expected in ("configuration: flux_kontext", "rows used", "expected padding ratio", "LoRA weights written"):
        assert any(expected in line for line in info), (expected, info)
    assert list((out / "wandb").glob("offline-run-*")), "W&B's files belong under --output_dir"
    files = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"run.json", "training_state.json", "optimizer.bin", "pytorch_lora_weights.safetensors"} <= files
    assert not [name for name in files if name.startswith("custom_checkpoint")], files

    before = snapshot(out)
    assert {"checkpoint-1", "checkpoint-2", "run.json", "metrics.jsonl"} <= {p.parts[0] for p in before}
    status, lines = audited_run(checkpoint, [*argv, "--learning_rate", "5e-4"])
    assert status == 2
    error = user_error_lines(lines)
    assert "already holds the results of another run" in error and "--resume_from_checkpoint latest" in error
    assert snapshot(out) == before  # byte-identical

    marker = root / "payload-ran"
    for name in ("random_states_0.pkl", "pytorch_model.bin", "scheduler.bin"):
        torch.save(Payload(marker), out / "checkpoint-2" / name)
    resumed = ["--output_dir", str(out), "--max_train_steps", "3", "--report_to", "none", "--quiet"]
    status, lines = audited_run(checkpoint, [*resumed, "--resume_from_checkpoint", "latest"])
    assert status == 0, "\n".join(lines[-30:])
    assert not [line for line in lines if line.startswith("INFO ")]
    assert not marker.exists()
    assert [r["step"] for r in h.metrics(out)] == [1, 2, 3]
    assert json.loads((out / "checkpoint-3" / "run.json").read_text()) == json.loads((out / "run.json").read_text())
    config = json.loads((out / "training_config.json").read_text())
    assert config["rank"] == 4 and config["lora_alpha"] == 6 and config["multi_resolutions"] == h.RESOLUTIONS


MISTAKES = {
    "missing dataset": (["--dataset", "/nonexistent/pairs"], "dataset '/nonexistent/pairs': no such file or folder"),
    "missing cache": (["--cache_dir", "/nonexistent/cache"], "no cache at /nonexistent/cache"),
}


@pytest.fixture(scope="module")
def refusals(setup, tiny_checkpoint):
    """The refused runs, in one audited process: each of MISTAKES on FLUX.1 Kontext's script, then
    train_qwen_edit.py given Qwen-Image-Edit-Plus's checkpoint. {name: (exit status, stderr lines)}."""
    root, checkpoint, flags = setup
    other = tiny_checkpoint("qwen_edit_plus")
    cases = [
        ("train_flux_kontext.py", [*flags, *h.train_flags(root / "never"), *change]) for change, _ in MISTAKES.values()
    ]
    argv = ["--pretrained_model_name_or_path", str(other), "--dataset", str(root / "data")]
    argv += ["--cache_dir", str(root / "never"), "--output_dir", str(root / "never"), "--report_to", "none"]
    cases.append(("train_qwen_edit.py", argv))
    runs = audited_runs([checkpoint, other], cases)
    return dict(zip([*MISTAKES, "another model"], runs, strict=True))


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_are_one_line_before_any_model_file_is_opened(setup, refusals, mistake):
    root, _, _ = setup
    status, lines = refusals[mistake]
    assert status == 2
    assert MISTAKES[mistake][1] in user_error_lines(lines)
    assert not (root / "never").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max_grad_norm", "-1", "must be > 0"),
        ("--lora_alpha", "0", "must be > 0"),
        ("--rank", "0", "must be >= 1"),
        ("--learning_rate", "nan", "must be > 0"),
        ("--control_dropout", "1.5", "must be >= 0 and <= 1"),
        ("--adam_beta2", "1", "must be >= 0 and < 1"),
        ("--max_train_steps", "0", "must be >= 1"),
        ("--seed", "-3", "must be >= 0"),
        ("--max_sequence_length", "600", "<= 512"),
        ("--lr_scheduler", "cosin", "expected one of"),
        ("--max_aspect_ratio", "0.5", ">= 1"),
    ],
)
def test_every_numeric_flag_has_a_range(setup, flag, value, message):
    import train_flux_kontext

    _, _, flags = setup
    with pytest.raises(UserError, match=f"{flag}.*{message}" if flag != "--lr_scheduler" else message):
        train_flux_kontext.parse_args([*flags, flag, value])


def test_precompute_refuses_rows_the_model_cannot_take_before_encoding_and_fails_on_no_usable_rows(setup, tmp_path):
    """FLUX.1 Kontext takes one reference: rows with two are refused up front (not at the training step that draws
    them); with --skip_bad_samples and every row bad, the run fails instead of reporting success with 0 rows."""
    _, checkpoint, _ = setup
    data = h.dataset(tmp_path, "qwen_edit_plus", rows=4)  # rows with 1, 2, 1, 0 controls
    argv = ["--model", MODEL, *h.data_flags(MODEL, checkpoint, data), "--cache_dir", str(tmp_path / "cache")]
    status, lines = audited_run(checkpoint, argv, "precompute_cache.py")
    assert status == 2
    error = user_error_lines(lines)
    assert "bad sample '001': FLUX.1 Kontext takes one control image, got 2" in error
    assert f"control_1: {data / '001_control_1.png'}" in error and "--skip_bad_samples" in error
    assert not list((tmp_path / "cache").glob("shard-*"))

    for path in data.glob("*.png"):
        path.write_bytes(b"broken")
    status, lines = audited_run(checkpoint, [*argv, "--skip_bad_samples"], "precompute_cache.py")
    assert status == 2, "\n".join(lines[-20:])
    assert "no usable rows (4 rows, 4 skipped; first: bad sample '000'" in user_error_lines(lines)


def test_a_checkpoint_of_another_model_is_one_line_before_anything_loads(setup, refusals):
    """The checkpoint's model_index.json names its pipeline; a script given another model's says which script
    trains it (other scripts and precompute_cache.py, in the process: tests/test_cli.py)."""
    root, _, _ = setup
    status, lines = refusals["another model"]
    assert status == 2
    assert (
        "names 'QwenImageEditPlusPipeline'; train_qwen_edit.py takes QwenImageEditPipeline checkpoints; it is "
        "Qwen-Image-Edit-Plus: train_qwen_edit_plus.py trains it (precompute_cache.py --model qwen_edit_plus)"
    ) in user_error_lines(lines)
    assert not (root / "never").exists()


def test_wandb_without_login_is_one_line_before_anything_loads(setup, tmp_path):
    """--report_to wandb (the default) with no API key anywhere (empty HOME: no netrc, no W&B settings) and no
    WANDB_MODE: one line with the ways out, before anything is loaded or written, so the same command reruns."""
    root, checkpoint, flags = setup
    env = {k: v for k, v in h.ENV.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path)
    argv = [*flags, "--output_dir", str(root / "never"), "--max_train_steps", "1"]
    status, lines = audited_run(checkpoint, argv, env=env)
    assert status == 2
    error = user_error_lines(lines)
    for way_out in ("wandb login", "WANDB_MODE=offline", "--report_to none"):
        assert way_out in error, error
    assert not (root / "never").exists() and not list(tmp_path.iterdir())


def test_a_forgotten_control_image_is_refused_naming_the_rows(setup, tmp_path, capsys):
    """Folder layout: a missing stem_control.png made a silent target-only row; with other rows holding controls it
    is refused in one line (status 2) naming the row and the flag that allows it, before the encoders load or the
    cache is written. In-process through the scripts' `run_script`: the subprocess cases above cover its output."""
    import precompute_cache
    from common.errors import EXIT_USER_ERROR, run_script

    _, checkpoint, _ = setup
    data = h.dataset(tmp_path, MODEL, rows=4)  # every row has one control
    (data / "002_control.png").unlink()
    flags = [flag for flag in h.data_flags(MODEL, checkpoint, data) if flag != "--allow_target_only"]
    argv = ["--model", MODEL, *flags, "--cache_dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exit_status:
        run_script(lambda: precompute_cache.main(precompute_cache.parse_args(argv)))
    assert exit_status.value.code == EXIT_USER_ERROR
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: dataset {data}: 1 of 4 rows have no control image while the others have one: 002;")
    assert "--allow_target_only" in error
    assert not (tmp_path / "c").exists()  # refused before the cache (and the encoders that would fill it)


# Runs a script as __main__ and sends itself a real SIGINT (Ctrl-C) when it opens a file whose path contains
# INTERRUPT_AT: there, inside the checkpoint's plot save, where an interrupt used to print a 58-line double traceback.
INTERRUPTING = """
import os, runpy, signal, sys
where = os.environ["INTERRUPT_AT"]
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and where in os.fsdecode(args[0]):
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_during_a_checkpoint_says_how_to_resume_and_leaves_no_partial_checkpoint(setup):
    """A SIGINT while checkpoint-2 is being written: exit 130, no traceback, one line naming the step, the last
    complete checkpoint and the exact resume command; no .checkpoint-2.tmp left. The printed command resumes."""
    import shlex

    root, _, flags = setup
    out = root / "interrupted"
    argv = [*flags, *h.train_flags(out, "--max_train_steps", "3", "--checkpointing_steps", "1")]
    env = {**h.ENV, "PYTHONPATH": str(h.ROOT), "INTERRUPT_AT": ".checkpoint-2.tmp/.training_curves"}
    script = str(h.ROOT / "train_flux_kontext.py")
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTING, script, *argv], cwd=h.ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("interrupted: ")]
    expected = f"interrupted: at step 2 of 3; the last complete checkpoint is {out / 'checkpoint-1'}; resume with: "
    assert line.startswith(expected), line
    command = shlex.split(line.removeprefix(expected))
    assert command == ["accelerate", "launch", "train_flux_kontext.py", *argv, "--resume_from_checkpoint", "latest"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    (out / ".checkpoint-9.tmp").mkdir()  # as a SIGKILL during a save leaves it: the next start removes it
    h.train_inprocess(MODEL, command[3:])
    assert not (out / ".checkpoint-9.tmp").exists()
    assert [r["step"] for r in h.metrics(out)] == [1, 2, 3] and (out / "pytorch_lora_weights.safetensors").is_file()


def test_bitsandbytes_import_warning_about_its_cpu_nf4_kernel_is_dropped_and_its_other_warnings_pass(caplog):
    """bitsandbytes 0.50 logs it at import on AVX512-BF16 CPUs (a script's first stderr line there); importing
    `common` installs the filter. The message is read from bitsandbytes' source, so a changed one shows here."""
    import inspect
    import logging

    import bitsandbytes.backends.cpu.ops as ops

    import common  # noqa: F401  (imported first by every script; installs the filter)
    from common.errors import IRRELEVANT_LIBRARY_WARNINGS

    prefix = IRRELEVANT_LIBRARY_WARNINGS[ops.logger.name]
    assert f'"{prefix} from kernels-community: %s.' in inspect.getsource(ops)
    with caplog.at_level(logging.WARNING):
        ops.logger.warning(f"{prefix} from kernels-community: %s.", "No module named 'kernels'")
        ops.logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]
