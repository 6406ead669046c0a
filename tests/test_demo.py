"""The demo: plain Adam diverges, ClippedAdam does not, and the CLI works."""

import os
import subprocess
import sys

import pytest

from keras_clip import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_command_prints_the_table():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "keras_clip", "demo"], capture_output=True,
        text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["optimizer", "final", "loss", "diverged", "clip",
                                "rate", "skipped", "seconds"]
    adam, clipped = lines[1].split(), lines[2].split()
    assert adam[0] == "Adam" and adam[2] == "yes"
    assert clipped[0] == "ClippedAdam" and clipped[2] == "no"


def test_run_demo_rows():
    adam, clipped = cli.run_demo()
    assert adam["diverged"] and not clipped["diverged"]
    assert adam["clip_rate"] is None and 0 < clipped["clip_rate"] <= 1


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_bad_arguments_are_argparse_errors():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--epochs", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--max-norm", "-1"])
