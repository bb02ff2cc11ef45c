"""common.cli: no abbreviated flags; the checkpoint's pipeline picks or refuses the script's model; flags the user
does not give come from the run resumed and from the cache at --cache_dir."""

import json

import pytest
import trainer_harness as h

import precompute_cache
import train_flux2
import train_flux_kontext
import train_qwen_edit_plus
from common.cli import checkpoint_model
from common.demo import run
from common.errors import UserError
from common.models import get_model
from common.run_guard import run_identity, write_run
from common.training_data import data_fingerprint


def test_abbreviated_flags_are_refused(capsys):
    for parse in (
        train_flux_kontext.parse_args,
        lambda argv: precompute_cache.parse_args(["--model", "qwen_edit", *argv]),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse(["--pretrained_model_name_or_path", "m", "--dataset", "d", "--multi_resolution", "512*512"])
        assert exit_.value.code == 2
        assert "unrecognized arguments: --multi_resolution 512*512" in capsys.readouterr().err


def test_the_checkpoint_pipeline_must_be_the_script_model(tiny_checkpoint, tmp_path):
    qwen = str(tiny_checkpoint("qwen_edit_plus"))
    assert checkpoint_model(qwen, None, [get_model("qwen_edit_plus")], "x.py").name == "qwen_edit_plus"
    with pytest.raises(UserError, match=r"names 'QwenImageEditPlusPipeline'; train_flux_kontext.py takes Flux"):
        checkpoint_model(qwen, None, [get_model("flux_kontext")], "train_flux_kontext.py")
    # Through the scripts, in the process: refused before the output folder is touched.
    cases = [(train_flux_kontext, qwen, "train_flux_kontext.py takes FluxKontextPipeline")]
    cases += [(train_qwen_edit_plus, str(tiny_checkpoint("flux2_klein")), "it is FLUX.2 [klein]: train_flux2.py")]
    for script, checkpoint, message in cases:
        argv = ["--pretrained_model_name_or_path", checkpoint, "--dataset", str(tmp_path), "--report_to", "none"]
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            run(script.parse_args([*argv, "--output_dir", str(tmp_path / "out")]), script.MODEL)
        assert not (tmp_path / "out").exists()
    kontext = str(tiny_checkpoint("flux_kontext"))
    with pytest.raises(
        UserError, match="precompute_cache.py --model qwen_edit takes QwenImageEditPipeline checkpoints"
    ):
        precompute_cache.parse_args(
            ["--model", "qwen_edit", "--pretrained_model_name_or_path", kontext, "--dataset", "d", "--cache_dir", "c"]
        )


def test_cache_dir_alone_takes_the_cache_sizes_and_text_length(tiny_checkpoint, tmp_path):
    """Only the flags of the cache's size mode the user left out are taken, so a size typed is still compared."""
    checkpoint = tiny_checkpoint("flux_kontext")
    cache = tmp_path / "cache"
    built = precompute_cache.parse_args(
        ["--model", "flux_kontext", *h.data_flags("flux_kontext", checkpoint, tmp_path), "--cache_dir", str(cache)]
    )
    cache.mkdir()
    (cache / "fingerprint.json").write_text(json.dumps(data_fingerprint(built, "flux_kontext")))
    argv = ["--pretrained_model_name_or_path", str(checkpoint), "--cache_dir", str(cache), "--report_to", "none"]
    args = train_flux_kontext.parse_args(argv)
    assert args.multi_resolutions == ["64*64", "128*128", "192*192"] and args.max_sequence_length == 32
    assert data_fingerprint(args, "flux_kontext") == data_fingerprint(built, "flux_kontext")
    args = train_flux_kontext.parse_args([*argv, "--target_area", "96*96", "--max_sequence_length", "64"])
    assert args.multi_resolutions is None and args.target_area == "96*96" and args.max_sequence_length == 64


def test_resume_needs_only_the_output_dir(tiny_checkpoint, tmp_path):
    """The run's own record supplies every flag not typed again, the model of train_flux2.py's checkpoint included."""
    dev = str(tiny_checkpoint("flux2_dev"))
    first = train_flux2.parse_args(
        ["--pretrained_model_name_or_path", dev, "--cache_dir", "c", "--rank", "8", "--guidance_scale", "2.5"]
        + ["--output_dir", str(tmp_path), "--report_to", "none"]
    )
    run = {"run_id": "a" * 32, "identity": run_identity(first, "flux2_dev", 1), "flags": vars(first)}
    write_run(tmp_path, run)
    (tmp_path / "checkpoint-5").mkdir()
    write_run(tmp_path / "checkpoint-5", run)
    argv = ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest", "--learning_rate", "5e-5"]
    assert train_flux2.model_for(argv).name == "flux2_dev"
    resumed = train_flux2.parse_args(argv)
    assert (resumed.rank, resumed.guidance_scale, resumed.learning_rate) == (8, 2.5, 5e-5)
    assert resumed.pretrained_model_name_or_path == str(tiny_checkpoint("flux2_dev").resolve())
