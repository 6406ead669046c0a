"""Every tutorial runs top to bottom in fast mode and writes the figures it names.

Each tutorial runs in a fresh Python (tutorial 05 must configure TensorFlow's
devices before TensorFlow starts), with `KERAS_CLIP_FAST=1` and its output in a
temporary folder. A tutorial prints `wrote <path>` for every figure it writes;
the test checks that it printed at least one, and that each is a non-empty PNG
inside that folder.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WROTE = re.compile(r"^wrote (.+\.png)\s*$", re.MULTILINE)
# Tutorials written with TensorFlow's own API: they run on TensorFlow only.
TENSORFLOW_ONLY = {
    "01_exploding_gradients.py": "its training step is a tf.GradientTape loop",
    "05_distributed_and_mixed_precision.py": (
        "tf.distribute.MirroredStrategy on logical CPUs set up with tf.config"
    ),
}


def _tutorial(path):
    reason = TENSORFLOW_ONLY.get(os.path.basename(path))
    marks = [pytest.mark.tensorflow(reason=reason)] if reason else []
    return pytest.param(path, marks=marks, id=os.path.basename(path))


def test_there_are_five_tutorials():
    names = [os.path.basename(path) for path in TUTORIALS]
    assert len(names) == 5, names


@pytest.mark.slow
@pytest.mark.parametrize("path", [_tutorial(path) for path in TUTORIALS])
def test_tutorial_runs_and_writes_its_figures(path, tmp_path):
    env = dict(
        os.environ,
        KERAS_CLIP_FAST="1",
        KERAS_CLIP_OUT=str(tmp_path),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=ROOT,
        MPLBACKEND="Agg",
    )
    result = subprocess.run(
        [sys.executable, path],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{os.path.basename(path)} failed:\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-5000:]}"
    )
    written = WROTE.findall(result.stdout)
    assert written, f"no 'wrote <path>.png' line in:\n{result.stdout[-3000:]}"
    for figure in written:
        assert os.path.dirname(os.path.abspath(figure)) == str(tmp_path), figure
        assert os.path.getsize(figure) > 0, figure
        with open(figure, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, figure
