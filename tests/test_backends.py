"""keras-clip on every Keras backend, the way a user trains: with `model.fit`.

This file runs unchanged under KERAS_BACKEND=tensorflow, jax and torch. The
tests in the first part train in this process on its backend; those in the
second start programs (tests/programs/backends_*.py) in subprocesses: one
without TensorFlow, JAX data parallelism on two devices, `.keras` files
moving between backends, and torch with two processes.

Tolerances are derived from float32 arithmetic, never picked: u = 2**-24 is
float32's unit roundoff, and a float32 sum or dot product of n terms is off by
at most gamma(n) = n u / (1 - n u) times the sum of the terms' magnitudes
(Higham, "Accuracy and Stability of Numerical Algorithms", 3.1 and 4.2).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_clip as kc
from keras_clip.optimizers import BUILTIN

BACKEND = keras.backend.backend()
U32 = 2.0**-24  # float32's unit roundoff
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")

# XLA where the backend has it: both settings on TensorFlow and JAX; torch
# trains eagerly (Keras's torch trainer has no XLA).
JIT = {"tensorflow": [True, False], "jax": [True, False], "torch": [False]}[BACKEND]
CLIPPERS = ["value", "norm", "global_norm", "agc", "autoclip", "zclip", "adagc"]


def gamma(n):
    """Higham's gamma_n: the relative error bound of n float32 roundings."""
    return n * U32 / (1 - n * U32)


def mlp():
    """6 -> 4 (tanh) -> 2."""
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dense(2, name="head"),
    ])


def regression(n, seed=0, scale=5.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = (np.stack([x.sum(1), 3 * x[:, 0]], axis=1) * scale).astype("float32")
    return x, y


def optimizer_values(opt):
    """{variable name: NumPy value} of every optimizer variable."""
    return {v.name: np.array(keras.ops.convert_to_numpy(v.value)) for v in opt.variables}


def slots_and_clipper_state(values):
    """The optimizer variables that hold the update rule's and the clipper's
    state: slots (`*_momentum`, `*_velocity`) and `clip_*`."""
    return {
        k: v for k, v in values.items()
        if k.endswith(("_momentum", "_velocity")) or k.startswith("clip_")
    }


class Recorder(keras.callbacks.Callback):
    """After each batch: the weights, the optimizer's variables and statistics,
    read through `self.model` (on JAX that brings the step's state back)."""

    def __init__(self):
        super().__init__()
        self.weights, self.optimizer, self.stats, self.logs = [], [], [], []

    def on_train_batch_end(self, batch, logs=None):
        model = self.model
        self.weights.append([np.array(w) for w in model.get_weights()])
        self.optimizer.append(optimizer_values(model.optimizer))
        self.stats.append(model.optimizer.gradient_stats())
        self.logs.append(dict(logs or {}))


# 1. Every Clipped* class trains in fit.

# Thresholds small for the data below (targets of scale 5), so the fixed
# clippers clip every step.
SMALL = {
    "value": lambda: kc.ValueClip(0.01),
    "norm": lambda: kc.NormClip(0.1),
    "global_norm": lambda: kc.GlobalNormClip(0.1),
    "agc": lambda: kc.AdaptiveGradClip(0.001),
    "autoclip": lambda: kc.AutoClip(50.0, history_size=4),
    "zclip": lambda: kc.ZClip(warmup_steps=1),
    "adagc": lambda: kc.AdaGC(warmup_steps=1),
}


def test_every_builtin_class_is_covered():
    names = {f"Clipped{n}" for n in kc.optimizers.builtin_optimizer_classes()}
    assert names == set(BUILTIN) and len(names) == 14


@pytest.mark.parametrize("jit", JIT, ids=lambda j: "jit" if j else "nojit")
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_class_fits(name, jit):
    # Each class with another clipper (by the class's place in the sorted list).
    clipper = CLIPPERS[sorted(BUILTIN).index(name) % len(CLIPPERS)]
    model = mlp()
    opt = BUILTIN[name](learning_rate=0.01, clipper=SMALL[clipper]())
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    before = [np.array(w) for w in model.get_weights()]
    x, y = regression(16)
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    after = model.get_weights()
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(w)) for w in after)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    stats = opt.gradient_stats()
    assert stats["steps"] == 2 and stats["nonfinite_steps"] == 0
    if clipper in ("value", "norm", "global_norm", "agc"):
        assert stats["clipped_steps"] == 2
    assert stats["clipped_grad_norm"] <= stats["grad_norm"]


# 2. Every clipper's first step in fit against NumPy.

D, K, B = 4, 3, 8  # inputs, outputs, batch of the linear model


def linear_gradient(x, y, kernel, bias):
    """The gradient of Keras's "mse" for `x @ kernel + bias`, in float64, and
    the same expression on magnitudes (what the float32 error bound scales)."""
    x, y, w, b = (np.asarray(a, "float64") for a in (x, y, kernel, bias))
    r = x @ w + b - y
    c = 2.0 / (len(x) * y.shape[1])
    r_abs = np.abs(x) @ np.abs(w) + np.abs(b) + np.abs(y)
    return [c * x.T @ r, c * r.sum(0)], [c * np.abs(x).T @ r_abs, c * r_abs.sum(0)]


def numpy_clip(name, grads, params, threshold):
    """The first step's clipped gradient of each clipper, in NumPy."""
    def scale(norm, bound):
        return 1.0 if norm <= bound else bound / norm

    # Thresholds and epsilon live in float32 variables, whatever the dtype.
    if threshold is not None:
        threshold = float(np.float32(threshold))

    if name == "value":
        return [np.clip(g, -threshold, threshold) for g in grads]
    if name == "norm":
        return [g * scale(np.linalg.norm(g), threshold) for g in grads]
    if name in ("global_norm", "zclip", "adagc"):
        # ZClip and AdaGC in warm-up clip the global norm to `max_norm`.
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        return [g * scale(norm, threshold) for g in grads]
    if name == "agc":
        out = []
        for g, p in zip(grads, params):
            axis = 0 if g.ndim == 2 else None  # a kernel's unit is a column
            g_norm = np.sqrt(np.sum(g**2, axis=axis, keepdims=True))
            p_norm = np.sqrt(np.sum(np.asarray(p, "float64") ** 2, axis=axis, keepdims=True))
            bound = threshold * np.maximum(p_norm, float(np.float32(1e-3)))
            out.append(g * np.where(g_norm > bound, bound / np.where(g_norm > 0, g_norm, 1), 1))
        return out
    assert name == "autoclip"  # its history holds only this norm: no clipping
    return grads


FIRST_STEP = {
    "value": (kc.ValueClip(0.05), 0.05),
    "norm": (kc.NormClip(0.5), 0.5),
    "global_norm": (kc.GlobalNormClip(1.0), 1.0),
    "agc": (kc.AdaptiveGradClip(0.01), 0.01),
    "autoclip": (kc.AutoClip(10.0), None),
    "zclip": (kc.ZClip(warmup_steps=5, max_norm=1.0), 1.0),
    "adagc": (kc.AdaGC(warmup_steps=5, max_norm=1.0), 1.0),
}


@pytest.mark.parametrize("name", CLIPPERS)
def test_first_step_in_fit_equals_numpy(name):
    clipper, threshold = FIRST_STEP[name]
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    model.compile(optimizer=kc.ClippedSGD(1.0, clipper=clipper), loss="mse")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, D)).astype("float32")
    y = (10 * x @ rng.standard_normal((D, K))).astype("float32")
    kernel, bias = (np.array(w) for w in model.get_weights())
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    got = np.concatenate([np.asarray(w, "float64").ravel() for w in model.get_weights()])

    grads, magnitudes = linear_gradient(x, y, kernel, bias)
    clipped = numpy_clip(name, grads, [kernel, bias], threshold)
    start = np.concatenate([kernel.ravel(), bias.ravel()]).astype("float64")
    want = start - np.concatenate([g.ravel() for g in clipped])  # SGD, lr = 1

    # Float32 error of the step, in the 2-norm over all weights:
    # - the gradient: the forward dot product (D terms, + bias, - y), the
    #   loss derivative (2 / (B K), at most 3 roundings) and the backward sum
    #   over the batch (B terms): at most gamma(D + B + 6) of `magnitudes`;
    #   every clip rule here is a projection for fixed weights (1-Lipschitz),
    #   so that error passes through it no larger;
    # - the clip factor: a norm of at most N = D K + K squares (gamma(N / 2 + 1)
    #   after the square root), a division and a product, and for AGC the
    #   weight's norm (gamma(D / 2 + 1)): at most gamma(N + 6) of the clipped
    #   gradient;
    # - the update w - g rounds once: u |w_new|.
    n = D * K + K
    bound = (
        gamma(D + B + 6) * np.sqrt(sum(np.sum(m**2) for m in magnitudes))
        + gamma(n + 6) * np.linalg.norm(want - start)
        + U32 * np.linalg.norm(want)
    )
    assert np.linalg.norm(got - want) <= bound
    stats = model.optimizer.gradient_stats()
    unclipped = start - np.concatenate([g.ravel() for g in grads])
    if name == "autoclip":
        assert stats["clipped_steps"] == 0
    else:
        # The bound tells clipping apart from none: the test can fail.
        assert stats["clipped_steps"] == 1
        assert np.linalg.norm(unclipped - want) > 100 * bound


# 3. A NaN batch is skipped.


@pytest.mark.parametrize("clipper", ["zclip", "autoclip"])
def test_nan_batch_changes_no_weight_slot_or_clipper_state(clipper):
    model = mlp()
    opt = kc.ClippedAdam(0.01, clipper=clipper)
    model.compile(optimizer=opt, loss="mse")
    x, y = regression(32)
    x[8 + 3, 0] = np.nan  # one sample of the second batch of four
    recorder = Recorder()
    history = model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
        callbacks=[kc.GradientMonitor(on_nonfinite=None), recorder],
    )
    assert np.isfinite(history.history["loss"][0])
    before, after = recorder.weights[0], recorder.weights[1]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    state_before = slots_and_clipper_state(recorder.optimizer[0])
    state_after = slots_and_clipper_state(recorder.optimizer[1])
    assert len(state_before) == 8 + len(opt.clipper.init_state([]))
    for key in state_before:
        np.testing.assert_array_equal(state_before[key], state_after[key], err_msg=key)
    assert [s["nonfinite_steps"] for s in recorder.stats] == [0, 1, 1, 1]
    assert [s["steps"] for s in recorder.stats] == [1, 2, 3, 4]
    # The clean steps around it do move all of these: the check can fail.
    third = slots_and_clipper_state(recorder.optimizer[2])
    assert not any(np.array_equal(a, b) for a, b in zip(after, recorder.weights[2]))
    assert not np.array_equal(state_after["clip_count"], third["clip_count"])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    # The logged loss (a running mean) leaves the NaN batch out.
    logged = [logs["loss"] for logs in recorder.logs]
    assert logged[1] == logged[0] and np.all(np.isfinite(logged))
    assert history.history["loss"][0] == logged[-1]


def test_without_the_monitor_the_logged_loss_is_nan():
    # The control for the History check above: Keras's own running mean.
    model = mlp()
    model.compile(optimizer=kc.ClippedAdam(0.01, clipper="zclip"), loss="mse")
    x, y = regression(32)
    x[8 + 3, 0] = np.nan
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isnan(history.history["loss"][0])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# 4. Save, load, resume.

ADAPTIVE = {
    # Both clip from their own state within the 12 steps below.
    "zclip": lambda: kc.ZClip(warmup_steps=4, z_thresh=0.5),
    "autoclip": lambda: kc.AutoClip(percentile=10.0, history_size=8),
}


def adam_model(clipper):
    model = mlp()
    model.compile(optimizer=kc.ClippedAdam(0.01, clipper=ADAPTIVE[clipper]()), loss="mse")
    return model


@pytest.mark.parametrize("clipper", sorted(ADAPTIVE))
def test_save_load_resume_equals_an_uninterrupted_run(clipper, tmp_path):
    x, y = regression(32)

    def fit(model, epochs):
        model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)

    through = adam_model(clipper)
    start = through.get_weights()
    fit(through, 3)
    first = adam_model(clipper)
    first.set_weights(start)
    fit(first, 2)
    path = str(tmp_path / "model.keras")
    first.save(path)
    saved = optimizer_values(first.optimizer)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer.clipper) is type(first.optimizer.clipper)
    restored = optimizer_values(loaded.optimizer)
    # In the same order (the names hold the model's name, which may differ).
    assert len(restored) == len(saved)
    for (key, a), b in zip(saved.items(), restored.values()):
        np.testing.assert_array_equal(a, b, err_msg=key)
    fit(loaded, 1)
    # The same program on the same backend and device runs the same float32
    # operations in the same order: the resumed run is the uninterrupted one,
    # bit for bit.
    for a, b in zip(loaded.get_weights(), through.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert loaded.optimizer.gradient_stats() == through.optimizer.gradient_stats()
    assert through.optimizer.gradient_stats()["clipped_steps"] > 0

    # The clipper's state decides the resumed steps: with it reset (all else
    # loaded), the run goes elsewhere.
    reset = keras.saving.load_model(path)
    fresh = kc.ClippedAdam(0.01, clipper=ADAPTIVE[clipper]())
    fresh.build(reset.trainable_variables)
    initial = {v.name: v for v in fresh.variables}
    for v in reset.optimizer.variables:
        if v.name.startswith("clip_"):
            v.assign(initial[v.name].value)
    fit(reset, 1)
    assert any(
        not np.array_equal(a, b) for a, b in zip(reset.get_weights(), through.get_weights())
    )


# 5. GradientMonitor.


def test_monitor_statistics_in_history_and_the_explode_alarm(capsys):
    # 24 steps of 8; step 16's targets are 1000 times larger.
    x, y = regression(192, scale=3.0)
    y[15 * 8 : 16 * 8] *= 1000.0
    model = mlp()
    model.compile(optimizer=kc.ClippedSGD(0.01, global_clipnorm=100.0), loss="mse")
    monitor = kc.GradientMonitor()
    recorder = Recorder()
    history = model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
        callbacks=[monitor, recorder],
    )
    h = history.history
    norms = [s["grad_norm"] for s in recorder.stats]
    assert len(norms) == 24
    np.testing.assert_allclose(h["grad_norm"], [np.mean(norms)], rtol=24 * U32)
    assert h["grad_norm_max"] == [max(norms)] and max(norms) == norms[15]
    np.testing.assert_allclose(
        h["clipped_grad_norm"], [np.mean([s["clipped_grad_norm"] for s in recorder.stats])],
        rtol=24 * U32,
    )
    # Only the spike passes the threshold of 100.
    assert h["clip_rate"] == [1 / 24] == [np.mean(np.array(norms) > 100.0)]
    assert recorder.logs[15]["grad_norm_max"] == norms[15]
    [event] = monitor.events
    assert (event.step, event.kind) == (16, "explode") and event.value == norms[15]
    out = capsys.readouterr().out
    assert f"exploding gradient at step 16: global norm {event.value:.4g} is" in out
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# 6. GradientHistogramLogger.


def read_histograms(log_dir):
    """{tag: [(step, value)]} of the run, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "train"), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = sorted(acc.Tensors(tag), key=lambda e: e.step)
        out[tag] = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in events]
        out[tag + ":plugin"] = acc.SummaryMetadata(tag).plugin_data.plugin_name
    return out


def check_histograms(tags, layers, norms, logged):
    """Each layer's histogram, zeros and non-finite entries add up to its
    size (`layers`: {name: size}) at each logged step; the norm written is
    the optimizer's statistic of that step (`norms`, one per step)."""
    for name, size in layers.items():
        points = tags[f"gradients/{name}"]
        assert tags[f"gradients/{name}:plugin"] == "histograms"
        assert [s for s, _ in points] == logged
        zeros = dict(tags[f"gradient_zero_fraction/{name}"])
        nonfinite = dict(tags[f"gradient_nonfinite/{name}"])
        for step, buckets in points:
            assert buckets.shape == (64 + 2, 3)  # underflow, 64 bins, overflow
            counts = buckets[:, 2]
            assert np.all(counts == np.round(counts)) and np.all(counts >= 0)
            # The zero count over the size, rounded to float32 (relative u):
            # times the size, within size * u of a whole number.
            n_zero = round(float(zeros[step]) * size)
            assert abs(float(zeros[step]) * size - n_zero) <= size * U32
            assert counts.sum() + n_zero + nonfinite[step] == size
            assert nonfinite[step] == 0
    written = dict(tags["gradient_stats/grad_norm"])
    assert sorted(written) == logged
    for step in logged:
        assert written[step] == np.float32(norms[step])


def layer_sizes(model):
    return {
        layer.kernel.path.rsplit("/", 1)[0]: sum(
            int(np.prod(w.shape)) for w in layer.trainable_weights
        )
        for layer in model.layers
    }


def test_histogram_logger_writes_what_tensorboard_reads(tmp_path):
    model = mlp()
    model.compile(optimizer=kc.ClippedAdam(0.01, clipper="global_norm"), loss="mse")
    x, y = regression(40)
    recorder = Recorder()
    logger = kc.GradientHistogramLogger(str(tmp_path), freq=2)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[logger, recorder])
    tags = read_histograms(str(tmp_path))
    norms = [stats["grad_norm"] for stats in recorder.stats]
    check_histograms(tags, layer_sizes(model), norms, logged=[0, 2, 4])


# 7. In subprocesses.


def run_program(name, *args, backend=None, env=None, timeout=600):
    """Runs tests/programs/NAME with this Python; returns its JSON output."""
    environment = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    if backend:
        environment["KERAS_BACKEND"] = backend
    proc = subprocess.run(
        [sys.executable, os.path.join(PROGRAMS, name), *args], capture_output=True,
        text=True, timeout=timeout, env=environment, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# 7a. The histogram logger without TensorFlow.


@pytest.mark.slow
@pytest.mark.jax(reason="the subprocess runs the session's backend, without TensorFlow")
@pytest.mark.torch(reason="the subprocess runs the session's backend, without TensorFlow")
def test_histogram_logger_without_tensorflow(tmp_path):
    out = run_program("backends_no_tensorflow.py", str(tmp_path), backend=BACKEND)
    assert out["backend"] == BACKEND
    # TensorFlow stayed unimportable the whole run.
    assert out["tensorflow_module"] == "None" and not out["tensorflow_importable"]
    tags = {}
    for tag, entry in out["tags"].items():
        tags[tag] = [(step, np.asarray(value)) for step, value in entry["points"]]
        tags[tag + ":plugin"] = entry["plugin"]
    assert len(out["norms"]) == 5
    check_histograms(tags, out["layers"], out["norms"], logged=[0, 2, 4])


# 7b. JAX data parallelism on two devices.


def relative_difference(a, b):
    return max(
        np.linalg.norm(np.subtract(x, y)) / np.linalg.norm(y) for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def data_parallel():
    """The float32 runs (one device and two) and the float64 run, in parallel."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    program = os.path.join(PROGRAMS, "backends_jax_data_parallel.py")
    procs = [
        subprocess.Popen([sys.executable, program, dtype], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for dtype in ("float32", "float64")
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out) for out, _ in outputs]


DP_STEPS, DP_BATCH = 3, 16  # as tests/programs/backends_jax_data_parallel.py trains
DP_CLIPPERS = CLIPPERS


def float32_bound(amplification, steps):
    """How far a float32 run may be from the float64 one, relative.

    Each step sums at most DP_BATCH terms per gradient entry (the batch; the
    two devices' halves then sum to the same terms in another order): a
    relative error of at most DP_BATCH u (Higham 4.2) per step, which the run
    magnifies by the factor the program measured in float64 (it perturbs the
    starting weights by u), for each of `steps` steps.
    """
    return steps * DP_BATCH * amplification * U32


def mlp_gradient(x, y, weights):
    """The gradient of "mse" for Dense(4, tanh) -> Dense(2), in float64."""
    w1, b1, w2, b2 = (np.asarray(w, "float64") for w in weights)
    x, y = np.asarray(x, "float64"), np.asarray(y, "float64")
    h = np.tanh(x @ w1 + b1)
    d_out = 2.0 * (h @ w2 + b2 - y) / y.size
    d_h = d_out @ w2.T * (1 - h**2)
    return [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


DP_THRESHOLDS = {"value": 0.05, "norm": 0.5, "global_norm": 1.0, "agc": 0.05}


@pytest.mark.slow
@pytest.mark.jax(reason="the subprocess trains on JAX; once per CI run")
@pytest.mark.parametrize("case", DP_CLIPPERS)
def test_jax_data_parallel_equals_one_device(case, data_parallel):
    float32, float64 = data_parallel
    assert float32["devices"] == 2
    one, two = float32[case]["one"], float32[case]["two"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["agree"]  # every device holds the same weights after each step
    amplification = float64[case]["amplification"]
    reference = float64[case]["one"]["steps"]
    for run in (one, two):
        for step in (0, DP_STEPS - 1):
            bound = float32_bound(amplification[step], step + 1)
            assert relative_difference(run["steps"][step], reference[step]) <= bound
    # Clipping is active on every step the rule can clip (AutoClip never
    # clips its first).
    expected = DP_STEPS - 1 if case == "autoclip" else DP_STEPS
    assert one["stats"]["clipped_steps"] == two["stats"]["clipped_steps"] == expected


@pytest.mark.slow
@pytest.mark.jax(reason="the subprocess trains on JAX; once per CI run")
@pytest.mark.parametrize("case", sorted(DP_THRESHOLDS))
def test_jax_bound_catches_clipping_each_device_half(case, data_parallel):
    # The first step in NumPy: the gradient of the whole batch, clipped; and
    # what clipping each device's half-batch gradient before the mean gives.
    float32, float64 = data_parallel
    x, y = (np.asarray(a) for a in float32["first_batch"])
    start = [np.asarray(w, "float64") for w in float32["start"]]
    threshold = DP_THRESHOLDS[case]

    def step(grads):
        return [w - g for w, g in zip(start, grads)]  # SGD, learning rate 1

    right = step(numpy_clip(case, mlp_gradient(x, y, start), start, threshold))
    halves = [
        numpy_clip(case, mlp_gradient(x[i : i + 8], y[i : i + 8], start), start, threshold)
        for i in (0, 8)
    ]
    per_device = step([(a + b) / 2 for a, b in zip(*halves)])
    reference = float64[case]["one"]["steps"][0]
    # The NumPy rule is the rule the float64 run applies, up to float32
    # rounding: keras-clip accumulates norms in float32 and keeps thresholds
    # in float32 variables, whatever the gradient dtype (measured 7e-8 to
    # 2e-7 relative here, where float32_bound is 1e-6 to 2e-5).
    amplification = float64[case]["amplification"][0]
    bound = float32_bound(amplification, 1)
    assert relative_difference(right, reference) <= bound
    assert relative_difference(float32[case]["two"]["steps"][0], reference) <= bound
    assert relative_difference(per_device, reference) > bound


@pytest.mark.slow
@pytest.mark.jax(reason="the subprocess trains on JAX; once per CI run")
def test_jax_nan_on_one_device_skips_the_step_everywhere(data_parallel):
    float32, _ = data_parallel
    for run in float32["nan_skip"].values():
        first, second, third = run["steps"]
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)  # step 2 changed nothing
        assert any(not np.array_equal(a, b) for a, b in zip(second, third))
        assert run["stats"]["nonfinite_steps"] == 1 and run["stats"]["steps"] == 3
        assert run["agree"]
        assert all(np.all(np.isfinite(w)) for w in third)


# 7c. A `.keras` file moves between backends.

# (saving backend, loading backend): each pair runs in the session of the
# backend that loads, so each CI run tries one.
MOVES = [
    pytest.param("tensorflow", "jax", marks=pytest.mark.jax(reason="loads on JAX")),
    pytest.param("jax", "torch", marks=pytest.mark.torch(reason="loads on torch")),
    pytest.param("torch", "tensorflow",
                 marks=pytest.mark.tensorflow(reason="loads on TensorFlow")),
]
CONTINUED_STEPS, FILE_BATCH = 4, 8  # one epoch of tests/programs/backends_keras_file.py


@pytest.mark.slow
@pytest.mark.parametrize("saving, loading", MOVES)
def test_keras_file_moves_between_backends(saving, loading, tmp_path):
    path = str(tmp_path / "model.keras")
    saved = run_program("backends_keras_file.py", "save", path, backend=saving)
    loaded = run_program("backends_keras_file.py", "load", path, backend=loading)
    assert (saved["backend"], loaded["backend"]) == (saving, loading)
    # Every weight, Adam slot, clipper state and statistic, exactly.
    before, after = saved["saved"], loaded["loaded"]
    assert len(after["optimizer"]) == len(before["optimizer"])
    for (name, a), (_, b) in zip(before["optimizer"], after["optimizer"]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    names = [name for name, _ in before["optimizer"]]
    assert sum(n.endswith(("_momentum", "_velocity")) for n in names) == 8
    assert {"clip_count", "clip_mean", "clip_var", "clip_buffer"} <= set(names)
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b)
    assert after["stats"] == before["stats"]

    # The continuation on the loading backend is the saving backend's, up to
    # float32 rounding: each of the CONTINUED_STEPS steps sums at most
    # FILE_BATCH terms per gradient entry, in an order each backend picks
    # (relative error at most FILE_BATCH u, Higham 4.2), which the run
    # magnifies by the factor the load program measured; both runs are
    # within that of the exact continuation.
    bound = 2 * CONTINUED_STEPS * FILE_BATCH * loaded["amplification"] * U32
    want = saved["continued"]["weights"]
    assert relative_difference(loaded["continued"]["weights"], want) <= bound
    assert loaded["continued"]["stats"]["clipped_steps"] > before["stats"]["clipped_steps"]
    # Without the feature: a new optimizer, or only the clipper's state
    # reset, lands outside the bound.
    assert relative_difference(loaded["without_optimizer_state"], want) > bound
    assert relative_difference(loaded["without_clipper_state"], want) > bound


# 7d. torch with two processes.


@pytest.mark.slow
@pytest.mark.torch(reason="torch.distributed is torch's")
def test_torch_two_processes_refuse_to_build(tmp_path):
    out = run_program(
        "backends_torch_two_processes.py", str(tmp_path / "init"), backend="torch"
    )
    assert [r["rank"] for r in out] == [0, 1]
    for r in out:
        assert r["error"] == "NotImplementedError"
        assert r["message"].startswith("keras-clip on torch supports one process")
        assert r["message"].endswith("Received: world_size=2")
