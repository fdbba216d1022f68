"""The avfast command."""

import subprocess
import sys

import pytest

from avfast import cli


def test_info_lists_every_backend_of_every_op():
    result = subprocess.run([sys.executable, "-m", "avfast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "triton", "device", "av_pair_attention float32", "cuda", "triton", "reference"):
        assert word in result.stdout
    assert "* reference" in result.stdout or "* cuda" in result.stdout or "* triton" in result.stdout


def test_unknown_command_and_benchmark_are_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-everything"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "no-such-benchmark"])
    with pytest.raises(SystemExit):
        cli.main(["info", "--verbose"])
    assert "invalid choice" in capsys.readouterr().err
