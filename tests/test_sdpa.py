"""common.sdpa: the --sdpa_kernels flag and the context that holds its choice."""

import argparse

import pytest

from common.sdpa import add_sdpa_args, enabled_sdpa_kernels, sdpa_kernels

ALL = ["flash", "efficient", "cudnn", "math"]


def test_the_default_excludes_cudnn_attention_and_a_wrong_name_is_one_error_line(capsys):
    parser = argparse.ArgumentParser()
    add_sdpa_args(parser)
    assert parser.parse_args([]).sdpa_kernels == ("flash", "efficient", "math")
    assert parser.parse_args(["--sdpa_kernels", "math, cudnn"]).sdpa_kernels == ("math", "cudnn")
    with pytest.raises(SystemExit):
        parser.parse_args(["--sdpa_kernels", "flash,cudann"])
    assert "error: argument --sdpa_kernels: expected names out of flash,efficient,cudnn,math" in capsys.readouterr().err


def test_the_choice_holds_inside_only_also_as_a_decorator():
    @sdpa_kernels()
    def inside() -> list[str]:
        return enabled_sdpa_kernels()

    with sdpa_kernels(ALL):  # tests run inside the default (conftest); start from every kernel allowed
        assert enabled_sdpa_kernels() == ALL
        assert inside() == inside() == ["flash", "efficient", "math"]
        with sdpa_kernels(["math"]):
            assert enabled_sdpa_kernels() == ["math"]
        assert enabled_sdpa_kernels() == ALL
