"""The demo: global-norm clipping learns where plain Adam stalls; the CLI works.

The claim is checked on the five seeds 0-4 (about 25 s each);
`KERAS_CLIP_DEMO_SEEDS` picks others.
"""

import glob
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_clip import __main__ as cli
from keras_clip import _demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = [int(s) for s in os.environ.get("KERAS_CLIP_DEMO_SEEDS", "0,1,2,3,4").split(",")]
# What TensorFlow's C++ log lines look like (absl's prefix, its startup notes).
TF_LOG_MARKS = ("I0000 ", "W0000 ", "E0000 ", "absl::InitializeLog", "cuInit", "cudart")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a new user runs it
    return env


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The fast mode: plain Adam and global-norm clipping, one epoch."""
    out = str(tmp_path_factory.mktemp("demo"))
    rows = _demo.run_demo(epochs=1, clippers=["global_norm"], out=out, verbose=False)
    return rows, out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`python -m keras_clip demo` in a new Python, in the fast mode."""
    out = str(tmp_path_factory.mktemp("cli"))
    proc = subprocess.run(
        [sys.executable, "-m", "keras_clip", "demo", "--epochs", "1",
         "--clippers", "global_norm", "--out", out],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600, env=_env(), cwd=ROOT,
    )
    return proc, out


# The claim.


@pytest.mark.slow
@pytest.mark.tensorflow(
    reason="the demo runs on TensorFlow in CI (time); the library's behaviour on "
    "this backend is covered by tests/test_backends.py"
)
@pytest.mark.parametrize("seed", SEEDS)
def test_global_norm_learns_where_plain_adam_stalls(seed, tmp_path):
    adam, clipped = _demo.run_demo(
        seed=seed, clippers=["global_norm"], out=str(tmp_path), verbose=False
    )
    baseline = clipped["baseline"]
    assert not clipped["diverged"]
    assert clipped["final_loss"] < _demo.LEARNED * baseline, clipped
    assert _demo.verdict(clipped) == "learned"
    # Plain Adam, on the same data from the same weights: no better than
    # predicting the mean, or not finite.
    assert adam["diverged"] or adam["final_loss"] >= baseline, adam
    assert _demo.verdict(adam) in ("stalled", "diverged")


def test_plain_run_is_keras_adam():
    # The plain run is keras-clip's Adam with no clipping and non-finite steps
    # applied, for its recorded norms: the same update as Keras's Adam.
    x, y = _demo.make_data(0, samples=256)
    model = _demo.make_model(0)
    initial = model.get_weights()
    plain = _demo.make_optimizer(_demo.PLAIN, 8)
    adam_keys = keras.optimizers.Adam().get_config()
    adam = keras.optimizers.Adam.from_config(
        {k: v for k, v in plain.get_config().items() if k in adam_keys}
    )
    weights = []
    for optimizer in (adam, plain):
        model.set_weights(initial)
        model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
        keras.utils.set_random_seed(0)
        model.fit(x, y, batch_size=_demo.BATCH_SIZE, epochs=2, verbose=0)
        weights.append(model.get_weights())
    assert isinstance(adam.get_config()["learning_rate"], dict)  # the schedule
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


# The fast mode: the table, the plot, the TensorBoard logs.


def test_rows_and_table_columns(fast_run):
    rows, _ = fast_run
    assert [r["run"] for r in rows] == ["adam", "global_norm"]
    adam, clipped = rows
    assert adam["clip_rate"] is None and adam["skipped"] is None
    assert 0 < clipped["clip_rate"] <= 1 and clipped["skipped"] == 0
    assert adam["baseline"] == clipped["baseline"] > 0
    # Same data, same initial weights: the first step's norm is the same.
    assert adam["grad_norm"][0] == clipped["grad_norm"][0]
    assert clipped["peak_norm"] == np.max(clipped["grad_norm"])
    steps = -(-_demo.SAMPLES // _demo.BATCH_SIZE)
    assert len(clipped["step_loss"]) == len(clipped["grad_norm"]) == steps
    lines = _demo.format_table(rows).splitlines()
    header = lines[0]
    for column in _demo.COLUMNS:
        assert column in header
    assert [line.split()[0] for line in lines[1:]] == ["adam", "global_norm"]
    assert len(lines[2].split()) == len(_demo.COLUMNS)


def test_plot_and_tensorboard_logs_are_written(fast_run):
    rows, out = fast_run
    png = os.path.join(out, "demo.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for run in ("adam", "global_norm"):
        events = glob.glob(os.path.join(out, "tensorboard", run, "train", "events.*"))
        # Keras's TensorBoard callback and the histogram logger: one file each.
        assert len(events) >= 2, events
        assert all(os.path.getsize(e) > 0 for e in events)
        validation = os.path.join(out, "tensorboard", run, "validation")
        assert glob.glob(os.path.join(validation, "events.*"))
    text = _demo.summary(rows, out)
    assert png in text and os.path.join(out, "tensorboard") in text


def test_plot_marks_nonfinite_steps(tmp_path):
    row = {
        "run": "adam",
        "baseline": 0.17,
        "step_loss": np.array([1e9, 10.0, np.nan, np.inf, np.nan]),
        "grad_norm": np.array([1e10, 1e3, np.inf, np.nan, np.nan]),
    }
    path = _demo.plot([row], str(tmp_path / "sub" / "plot.png"))
    assert os.path.getsize(path) > 0


def test_verdicts_and_conclusion():
    def row(run, loss, diverged=False):
        return {"run": run, "final_loss": loss, "baseline": 0.2, "diverged": diverged}

    rows = [
        row("adam", float("nan"), diverged=True),
        row("a", 0.01),
        row("b", 0.1),
        row("c", 5.0),
    ]
    verdicts = ["diverged", "learned", "partly", "stalled"]
    assert [_demo.verdict(r) for r in rows] == verdicts
    text = _demo.conclusion(rows)
    assert "Learned the task (final loss under 10% of the baseline's): a." in text
    assert "Diverged (a weight or the loss is not finite): adam." in text


def test_unknown_clipper_is_a_value_error():
    with pytest.raises(ValueError, match="Received: clippers="):
        _demo.run_demo(clippers=["nope"])


# The command line.


def test_cli_names_match_the_demo():
    assert cli.DEMO_CLIPPERS == tuple(_demo.CLIPPERS)
    assert cli.DEMO_EPOCHS == _demo.EPOCHS


@pytest.mark.slow
def test_demo_command_prints_progress_table_and_paths(cli_run):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    first = [line.startswith("keras-clip demo:") for line in lines].index(True)
    own = lines[first:]
    assert any(line.startswith("[1/2] adam") and "epoch 1/1" in line for line in own)
    assert any(line.startswith("[2/2] global_norm") for line in own)
    header = next(line for line in own if line.startswith("run "))
    for column in _demo.COLUMNS:
        assert column in header
    assert f"Plot: {os.path.join(out, 'demo.png')}" in own
    assert os.path.exists(os.path.join(out, "demo.png"))
    assert os.path.isdir(os.path.join(out, "tensorboard", "global_norm"))


@pytest.mark.slow
def test_nothing_but_the_demos_own_lines(cli_run):
    proc, _ = cli_run
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("keras-clip demo:"), proc.stdout[:2000]
    assert not [line for line in lines if any(m in line for m in TF_LOG_MARKS)]


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--clippers", "--out", "--seed", "global_norm"):
        assert option in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_clippers_argument():
    parse = cli.make_parser().parse_args
    assert parse(["demo", "--clippers", "zclip, norm,agc"]).clippers == [
        "zclip", "norm", "agc"
    ]
    assert parse(["demo", "--clippers", "all"]).clippers == list(cli.DEMO_CLIPPERS)
    assert parse(["demo"]).clippers == list(cli.DEMO_CLIPPERS)
    assert parse(["demo"]).out == cli.DEMO_OUT


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_bad_arguments_are_argparse_errors(capsys):
    for argv in (
        ["demo", "--epochs", "0"],
        ["demo", "--epochs", "x"],
        ["demo", "--clippers", "nope"],
        ["demo", "--clippers", ","],
        ["demo", "--seed", "1.5"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "unknown clipper 'nope'" in capsys.readouterr().err


def test_the_demo_needs_matplotlib_only_to_plot():
    # In a new Python without matplotlib (Keras itself imports it when it is
    # installed): `__main__` parses arguments without importing `_demo`, and
    # `_demo` imports matplotlib only in `plot`.
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "from keras_clip import __main__ as cli\n"
        "cli.make_parser().parse_args(['demo'])\n"
        "assert 'keras_clip._demo' not in sys.modules\n"
        "from keras_clip import _demo\n"
        "try:\n"
        "    _demo.plot([], 'unused.png')\n"
        "except ImportError:\n"
        "    print('plot needs matplotlib')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env=_env(), cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "plot needs matplotlib"
