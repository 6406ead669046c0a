"""GradientHistogramLogger: bucket counts vs NumPy, event files read back by
TensorBoard's own reader, a real TensorBoard server, and the contract that the
callback reads the step and does not rewrite it."""

import ast
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import keras_clip as kc
from keras_clip import backend
from keras_clip import stats
from keras_clip.callbacks import histogram
from keras_clip.callbacks.histogram import GradientHistogramLogger
from keras_clip.callbacks.histogram import bucket_edges

BACKEND = keras.backend.backend()
# `jit_compile=True` compiles the train step with XLA on TensorFlow and JAX; on
# torch it is `torch.compile`, not the eager loop torch's `fit` runs by default
# (and minutes per `fit` here).
FIT_JIT_COMPILE = BACKEND != "torch"
NOT_TORCH_COMPILE = [
    pytest.mark.tensorflow(reason="jit_compile=True is XLA; torch's is torch.compile"),
    pytest.mark.jax,
]
# Whether `fit` traces the step once and then runs it without its Python
# (torch's eager loop runs the step's Python every batch).
TRACED = BACKEND != "torch"

DEFAULT_EDGES = np.linspace(-12.0, 4.0, 65).astype("float32")
UNEVEN_EDGES = np.array([-9.0, -6.5, -5.0, -3.3, -3.0, -1.0, 0.0, 2.5], "float32")


# NumPy references.


def bucket_counts(grad, edges):
    """The counts the step takes, with the backend's fixed-length bincount."""
    return stats.bucket_counts(grad, edges, backend.bincount)


def np_buckets(values, edges):
    """[zeros, underflow, bins..., overflow, non-finite], bins [left, right)."""
    a = np.abs(np.asarray(values, "float32").ravel())
    finite = np.isfinite(a)
    positive = finite & (a > 0)
    index = np.searchsorted(edges, np.log10(a[positive]), side="right")
    bins = np.bincount(index, minlength=len(edges) + 1)
    return np.concatenate([[np.sum(a[finite] == 0)], bins, [np.sum(~finite)]])


def magnitudes(rng, n, edges, low=-14.0, high=6.0):
    """`n` values of log10|g| at least 0.01 from every edge: float32 rounding
    of the log cannot move them across one."""
    x = rng.uniform(low, high, 4 * n)
    x = x[np.min(np.abs(x[:, None] - edges[None, :].astype("float64")), axis=1) > 0.01]
    return x[:n]


def known_gradient(rng, shape, edges, zeros=0, nonfinite=(), low=-14.0, high=6.0):
    """A gradient with the given number of exact zeros and non-finite values."""
    size = int(np.prod(shape))
    g = np.sign(rng.standard_normal(size)) * 10.0 ** magnitudes(rng, size, edges, low, high)
    g = g.astype("float32")
    where = rng.permutation(size)
    g[where[:zeros]] = 0.0
    for i, value in enumerate(nonfinite):
        g[where[zeros + i]] = value
    return g.reshape(shape)


def read_run(log_dir):
    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "train"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc


def series(acc, tag):
    """[(step, value as NumPy)] of one tag, in step order."""
    events = sorted(acc.Tensors(tag), key=lambda e: e.step)
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in events]


def plugin_of(acc, tag):
    return acc.SummaryMetadata(tag).plugin_data.plugin_name


def expected_buckets(edges):
    """Left and right edges of the written rows: underflow, bins, overflow."""
    e = edges.astype("float64")
    left = np.concatenate([[e[0] - (e[1] - e[0])], e])
    right = np.concatenate([e, [e[-1] + (e[-1] - e[-2])]])
    return left, right


# Arguments.


BAD_ARGUMENTS = [
    (dict(log_dir=3), TypeError, "`log_dir` must be a string or a path. Received: log_dir=3"),
    (dict(log_dir=""), ValueError, "`log_dir` must not be empty. Received: log_dir=''"),
    (dict(freq=0), ValueError, "`freq` must be in [1, inf]. Received: freq=0"),
    (dict(freq=2.5), TypeError, "`freq` must be an integer. Received: freq=2.5"),
    (dict(freq=True), TypeError, "`freq` must be an integer. Received: freq=True"),
    (dict(bins=0), ValueError, "`bins` must be in [1, inf]. Received: bins=0"),
    (dict(bins="64"), TypeError,
     "`bins` must be an integer or an increasing sequence of edges. Received: bins='64'"),
    (dict(bins=2.0), TypeError,
     "`bins` must be an integer or an increasing sequence of edges. Received: bins=2.0"),
    (dict(bins=[0, "1"]), TypeError,
     "`bins` must be an integer or an increasing sequence of edges. Received: bins=[0, '1']"),
    (dict(bins=[1.0]), ValueError,
     "`bins` edges must be at least 2 finite, strictly increasing numbers. "
     "Received: bins=[1.0]"),
    (dict(bins=[0, 1, 1]), ValueError,
     "`bins` edges must be at least 2 finite, strictly increasing numbers. "
     "Received: bins=[0, 1, 1]"),
    (dict(bins=[0, math.inf]), ValueError,
     "`bins` edges must be at least 2 finite, strictly increasing numbers. "
     "Received: bins=[0, inf]"),
    (dict(bins=[1.0, 1.0 + 1e-9]), ValueError,
     "`bins` edges must stay strictly increasing in float32. Received: bins=[1.0, 1.000000001]"),
    (dict(per="layers"), ValueError,
     '`per` must be one of "layer", "variable". Received: per=\'layers\''),
    (dict(per=None), TypeError,
     '`per` must be one of "layer", "variable". Received: per=None'),
    (dict(scalars=1), TypeError, "`scalars` must be a bool. Received: scalars=1"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments_fail_in_init(kwargs, error, message):
    kwargs = {"log_dir": "logs", **kwargs}
    with pytest.raises(error) as info:
        GradientHistogramLogger(**kwargs)
    assert str(info.value) == message


def test_without_tensorboard_fails_at_construction(monkeypatch):
    monkeypatch.setattr(histogram, "_has_tensorboard", lambda: False)
    with pytest.raises(ImportError) as info:
        GradientHistogramLogger("logs")
    assert str(info.value) == (
        "GradientHistogramLogger needs TensorBoard: pip install tensorboard"
    )


def test_construction_creates_nothing_and_round_trips(tmp_path):
    log_dir = tmp_path / "logs"
    logger = GradientHistogramLogger(log_dir, freq=7, bins=[-3, -1, 0.5], per="variable")
    assert not log_dir.exists()
    assert logger.log_dir == log_dir and logger.freq == 7 and logger.per == "variable"
    config = logger.get_config()
    assert config == {
        "log_dir": str(log_dir), "freq": 7, "bins": [-3.0, -1.0, 0.5],
        "per": "variable", "scalars": True,
    }
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(logger)
    )
    assert type(again) is GradientHistogramLogger
    assert again.get_config() == config
    np.testing.assert_array_equal(GradientHistogramLogger("x").edges, DEFAULT_EDGES)


def test_bucket_edges():
    np.testing.assert_array_equal(bucket_edges(64), DEFAULT_EDGES)
    np.testing.assert_array_equal(bucket_edges(4), [-12, -8, -4, 0, 4])
    np.testing.assert_array_equal(bucket_edges(np.array([-2, 1])), [-2, 1])
    assert bucket_edges((1, 2, 5)).dtype == np.float32


def test_needs_a_keras_clip_optimizer(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    x, y = np.ones((4, 3), "float32"), np.ones((4, 1), "float32")
    with pytest.raises(TypeError) as info:
        model.fit(x, y, verbose=0, callbacks=[GradientHistogramLogger(tmp_path)])
    message = str(info.value)
    assert "Compile the model with `keras_clip.ClippedAdam(...)`." in message
    assert message.endswith(f"Received: optimizer={model.optimizer!r}")


# Bucket counts against NumPy.


def compiled(fn, mode):
    """`fn` run eagerly, traced by `tf.function`, or compiled with XLA."""
    if mode == "eager":
        return fn
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=mode == "jit")


MODES = [
    "eager",
    pytest.param("graph", marks=pytest.mark.tensorflow(reason="tf.function graph mode")),
    pytest.param("jit", marks=[
        pytest.mark.tensorflow(reason="XLA: tf.function(jit_compile=True) or jax.jit"),
        pytest.mark.jax,
    ]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "edges", [DEFAULT_EDGES, bucket_edges(5), UNEVEN_EDGES], ids=["64", "5", "uneven"]
)
def test_bucket_counts_match_numpy(edges, dtype, mode):
    rng = np.random.default_rng(1)
    low, high = (-4.0, 4.0) if dtype == "float16" else (-14.0, 6.0)
    g = known_gradient(
        rng, (7, 33), edges, zeros=5, nonfinite=(np.nan, np.inf, -np.inf),
        low=low, high=high,
    ).astype(dtype)
    fn = compiled(lambda t: bucket_counts(t, edges), mode)
    counts = keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(g)))
    expected = np_buckets(g.astype("float32"), edges)
    assert counts.dtype == np.int32 and counts.shape == (len(edges) + 3,)
    np.testing.assert_array_equal(counts, expected)
    assert counts[0] == 5 and counts[-1] == 3 and counts.sum() == g.size


def test_bucket_counts_half_open_bins_and_extremes():
    edges = np.array([-2.0, 0.0, 2.0], "float32")
    g = np.array(
        [1.0, -1.0, -1e3, 3.4e38, 0.05, 1e-3, 0.0, -0.0, np.nan, -np.inf], "float32"
    )
    # |g| = 1 sits on the edge 0 (log10 exact): bins are [left, right).
    counts = keras.ops.convert_to_numpy(bucket_counts(g, edges))
    assert counts.tolist() == [2, 1, 1, 2, 2, 2]


# Event files, read back by TensorBoard's reader, against NumPy.

SHAPES = {"hidden/kernel": (3, 4), "hidden/bias": (4,), "head/kernel": (4, 2), "head/bias": (2,)}
LAYERS = {"hidden": ["hidden/kernel", "hidden/bias"], "head": ["head/kernel", "head/bias"]}


def functional_model():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def known_steps(n_steps, edges):
    """Gradients per step: zeros everywhere, a NaN and an inf on step 2, one
    step (3) inside the clipping bound."""
    rng = np.random.default_rng(2)
    steps = []
    for t in range(n_steps):
        high = -2.0 if t == 3 else 1.0
        grads = {
            path: known_gradient(
                rng, shape, edges, zeros=1 + (t % 2), low=-14.0, high=high,
                nonfinite=(np.nan, np.inf) if (t == 2 and path == "head/kernel") else (),
            )
            for path, shape in SHAPES.items()
        }
        steps.append(grads)
    return steps


def applier(opt, variables):
    """`opt.apply` on NumPy gradients: compiled with XLA on TensorFlow (the
    counting must compile), eager elsewhere (`fit` compiles it there)."""
    if keras.backend.backend() != "tensorflow":
        return lambda grads: opt.apply([keras.ops.convert_to_tensor(g) for g in grads],
                                       variables)
    import tensorflow as tf

    return tf.function(lambda grads: opt.apply(grads, variables), jit_compile=True)


def drive(log_dir, steps, **kwargs):
    """Runs the callback's hooks around `opt.apply` (see `applier`)."""
    model = functional_model()
    opt = kc.ClippedSGD(learning_rate=0.01, global_clipnorm=1.0)
    model.compile(optimizer=opt, loss="mse")
    variables = model.trainable_variables
    assert [v.path for v in variables] == list(SHAPES)
    opt.build(variables)
    logger = GradientHistogramLogger(log_dir, **kwargs)
    logger.set_model(model)
    logger.on_train_begin()
    apply = applier(opt, variables)
    for t, grads in enumerate(steps):
        apply([grads[v.path] for v in variables])
        logger.on_train_batch_end(t)
    logger.on_train_end()
    assert logger._writer_ is None
    # The optimizer keeps the request (see the class docstring).
    assert opt.record_gradient_histograms(logger._histograms) is False
    return logger


def test_event_files_hold_numpy_histograms_and_scalars(tmp_path):
    edges = DEFAULT_EDGES
    steps = known_steps(7, edges)
    drive(tmp_path, steps, freq=2)
    acc = read_run(tmp_path)
    logged = [0, 2, 4, 6]

    left, right = expected_buckets(edges)
    for layer, paths in LAYERS.items():
        tag = f"gradients/{layer}"
        assert plugin_of(acc, tag) == "histograms"
        points = series(acc, tag)
        assert [s for s, _ in points] == logged
        for step, buckets in points:
            values = np.concatenate([steps[step][p].ravel() for p in paths])
            expected = np_buckets(values, edges)
            assert buckets.shape == (len(edges) + 1, 3)
            np.testing.assert_array_equal(buckets[:, 0], left)
            np.testing.assert_array_equal(buckets[:, 1], right)
            np.testing.assert_array_equal(buckets[:, 2], expected[1:-1])
            zero_fraction = dict(series(acc, f"gradient_zero_fraction/{layer}"))[step]
            nonfinite = dict(series(acc, f"gradient_nonfinite/{layer}"))[step]
            np.testing.assert_allclose(zero_fraction, expected[0] / values.size, rtol=1e-6)
            assert nonfinite == expected[-1]
            assert nonfinite == (2 if (step == 2 and layer == "head") else 0)
            assert expected[0] == 2 * (1 + step % 2)  # zeros counted, not dropped

    # The optimizer's statistics against NumPy, at the same steps.
    norms = [
        math.sqrt(sum(float(np.sum(np.square(g.astype("float64")))) for g in s.values()))
        for s in steps
    ]
    clipped = [math.isfinite(n) and n > 1.0 for n in norms]
    stats = {name: dict(series(acc, f"gradient_stats/{name}")) for name in
             ("grad_norm", "clipped_grad_norm", "clip_rate", "clip_threshold")}
    assert all(sorted(s) == logged for s in stats.values())
    previous = -1
    for step in logged:
        assert plugin_of(acc, "gradient_stats/grad_norm") == "scalars"
        np.testing.assert_allclose(stats["grad_norm"][step], norms[step], rtol=1e-5)
        if math.isfinite(norms[step]):
            np.testing.assert_allclose(
                stats["clipped_grad_norm"][step], min(norms[step], 1.0), rtol=1e-5
            )
        assert stats["clip_threshold"][step] == 1.0
        rate = sum(clipped[previous + 1: step + 1]) / (step - previous)
        np.testing.assert_allclose(stats["clip_rate"][step], rate, rtol=1e-6)
        previous = step
        for layer, paths in LAYERS.items():
            layer_norm = math.sqrt(
                sum(float(np.sum(np.square(steps[step][p].astype("float64")))) for p in paths)
            )
            written = dict(series(acc, f"gradient_norms/{layer}"))[step]
            np.testing.assert_allclose(written, layer_norm, rtol=1e-5)
    assert not clipped[3] and clipped[4]  # both cases are covered


def test_per_variable_uneven_bins_without_scalars(tmp_path):
    steps = known_steps(3, UNEVEN_EDGES)
    drive(tmp_path, steps, freq=1, bins=list(UNEVEN_EDGES), per="variable", scalars=False)
    acc = read_run(tmp_path)
    tags = set(acc.Tags()["tensors"])
    assert {f"gradients/{p}" for p in SHAPES} <= tags
    assert not any(t.startswith(("gradient_stats/", "gradient_norms/")) for t in tags)
    for path in SHAPES:
        points = series(acc, f"gradients/{path}")
        assert [s for s, _ in points] == [0, 1, 2]
        for step, buckets in points:
            expected = np_buckets(steps[step][path], UNEVEN_EDGES)
            np.testing.assert_array_equal(buckets[:, 2], expected[1:-1])
            np.testing.assert_array_equal(buckets[1:, 0], UNEVEN_EDGES)


def test_gradient_accumulation_counts_updates(tmp_path):
    model = functional_model()
    opt = kc.ClippedSGD(learning_rate=0.01, gradient_accumulation_steps=2)
    model.compile(optimizer=opt, loss="mse")
    variables = model.trainable_variables
    opt.build(variables)
    logger = GradientHistogramLogger(tmp_path, freq=2)
    logger.set_model(model)
    logger.on_train_begin()
    apply = applier(opt, variables)
    for t in range(10):
        apply([np.full(v.shape, t + 1.0, "float32") for v in variables])
        logger.on_train_batch_end(t)
    logger.on_train_end()
    # Keras's `iterations` counts the 5 updates: 0, 2 and 4 are logged.
    points = series(read_run(tmp_path), "gradients/hidden")
    assert [s for s, _ in points] == [0, 2, 4]
    # Update 2 applies the mean of the 5th and 6th gradients, 5.5.
    expected = np_buckets(np.full(16, 5.5, "float32"), DEFAULT_EDGES)
    np.testing.assert_array_equal(points[1][1][:, 2], expected[1:-1])


# Real `fit`s.


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype("float32")
    return x, (x @ rng.standard_normal((3, 2))).astype("float32") * 3


@pytest.mark.parametrize(
    "jit", [pytest.param(True, marks=NOT_TORCH_COMPILE), False], ids=["jit", "nojit"]
)
def test_fit_with_keras_tensorboard_in_the_same_run(tmp_path, jit):
    model = functional_model()
    model.compile(
        optimizer=kc.ClippedAdam(learning_rate=0.01, global_clipnorm=1.0),
        loss="mse",
        jit_compile=jit,
    )
    x, y = data()
    logger = GradientHistogramLogger(tmp_path, freq=4)
    board = keras.callbacks.TensorBoard(tmp_path, histogram_freq=1, update_freq=3)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[board, logger])
    acc = read_run(tmp_path)
    tags = set(acc.Tags()["tensors"])
    # Keras's weight histograms and batch scalars next to ours, in one run.
    assert {"hidden/kernel/histogram", "head/bias/histogram", "batch_loss"} <= tags
    assert {"gradients/hidden", "gradients/head", "gradient_stats/grad_norm"} <= tags
    assert plugin_of(acc, "hidden/kernel/histogram") == "histograms"
    for layer, size in (("hidden", 16), ("head", 10)):
        points = series(acc, f"gradients/{layer}")
        # Keras's `record_if` for its update_freq does not drop ours.
        assert [s for s, _ in points] == [0, 4, 8]
        for step, buckets in points:
            zeros = dict(series(acc, f"gradient_zero_fraction/{layer}"))[step]
            nonfinite = dict(series(acc, f"gradient_nonfinite/{layer}"))[step]
            total = buckets[:, 2].sum() + round(float(zeros) * size) + nonfinite
            assert total == size
    assert [s for s, _ in series(acc, "gradient_stats/clip_rate")] == [0, 4, 8]

    # A second `fit` goes on counting, stamped by the optimizer's steps.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    points = series(read_run(tmp_path), "gradients/hidden")
    assert [s for s, _ in points] == [0, 4, 8, 12, 16]


# The callback reads the step; it does not rewrite it.


def test_module_neither_imports_backend_nor_assigns_the_train_function():
    tree = ast.parse(open(histogram.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
            imported.add(node.module)
    assert "keras_clip.stats" in imported  # the walk sees the imports
    assert not {n for n in imported if n.startswith("keras_clip.backend")}
    assert not any(value is backend for value in vars(histogram).values())
    targets = [
        t for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
    ]
    attributes = {t.attr for t in targets if isinstance(t, ast.Attribute)}
    assert "_writer_" in attributes  # the walk sees attribute assignments
    assert "train_function" not in attributes
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"run_if", "add_gradient_probe", "remove_gradient_probe"}


class Traces:
    """Counts traces of the step's histogram counting (Python runs only while
    the step is traced; on torch, at every step) and records the train
    functions Keras makes."""

    def __init__(self, monkeypatch, model):
        self.count = 0
        self.made = []
        updates = stats.GradientHistograms.updates

        def traced_updates(request, *args, **kwargs):
            self.count += 1
            return updates(request, *args, **kwargs)

        monkeypatch.setattr(stats.GradientHistograms, "updates", traced_updates)
        make = model.make_train_function

        def recorded_make(force=False):
            made = make(force=force)
            # (Keras 3.15 returns None when it makes a new one.)
            self.made.append((force, model.train_function))
            return made

        monkeypatch.setattr(model, "make_train_function", recorded_make)


def counting_model():
    model = functional_model()
    model.compile(optimizer=kc.ClippedSGD(0.01, global_clipnorm=1.0), loss="mse",
                  jit_compile=FIT_JIT_COMPILE)
    return model


def fit3(model, **kwargs):
    """Three steps, in the same order every time."""
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, **kwargs)


def counted_step(logger):
    return logger._histograms.read()[0]


def logged_steps(log_dir):
    return [s for s, _ in series(read_run(log_dir), "gradients/hidden")]


def test_fit_runs_the_train_function_keras_made(tmp_path, monkeypatch):
    model = counting_model()
    fit3(model)
    plain = model.train_function
    traces = Traces(monkeypatch, model)
    logger = GradientHistogramLogger(tmp_path, freq=1)
    fit3(model, callbacks=[logger])
    # The request changed: the callback had Keras make a new train function,
    # which the step ran (and traced with the counting) as Keras made it.
    assert traces.made[-1][0] is True
    assert model.train_function is traces.made[-1][1]
    assert model.train_function is not plain
    assert traces.count > 0
    assert logged_steps(tmp_path) == [3, 4, 5]  # the optimizer's steps


def test_fit_again_does_not_retrace(tmp_path, monkeypatch):
    model = counting_model()
    traces = Traces(monkeypatch, model)
    logger = GradientHistogramLogger(tmp_path, freq=2)
    fit3(model, callbacks=[logger])
    first, train_function = traces.count, model.train_function
    assert first > 0
    fit3(model, callbacks=[logger])
    if TRACED:
        assert traces.count == first  # no new trace, no new compilation
    assert model.train_function is train_function
    assert all(force is False for force, _ in traces.made[2:])
    assert logged_steps(tmp_path) == [0, 2, 4]

    # Another `freq` is another request: traced again.
    logger.freq = 3
    fit3(model, callbacks=[logger])
    assert traces.count > first
    assert model.train_function is not train_function
    assert logged_steps(tmp_path) == [0, 2, 4, 6]


def test_fit_without_the_logger_trains_as_without_it(tmp_path):
    # Two models with the same weights and data: one with the logger at the
    # first and third `fit`, one never; the counting changes no update.
    keras.utils.set_random_seed(3)
    logged, plain = counting_model(), counting_model()
    initial = logged.get_weights()
    plain.set_weights(initial)
    logger = GradientHistogramLogger(tmp_path, freq=4)
    fit3(logged, callbacks=[logger])  # steps 0-2: 0 counted and written
    fit3(logged)  # steps 3-5: 4 counted, not written
    assert counted_step(logger) == 4
    assert logged_steps(tmp_path) == [0]
    fit3(logged, callbacks=[logger])  # steps 6-8: 8 written, not the stale 4
    assert logged_steps(tmp_path) == [0, 8]
    for _ in range(3):
        fit3(plain)
    assert int(logged.optimizer.iterations.numpy()) == 9
    for a, b in zip(logged.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(plain.get_weights()[0], initial[0])  # it trained


def test_record_none_stops_the_counting_after_a_retrace(tmp_path, monkeypatch):
    model = counting_model()
    logger = GradientHistogramLogger(tmp_path, freq=1)
    fit3(model, callbacks=[logger])
    assert counted_step(logger) == 2
    assert model.optimizer.record_gradient_histograms(None) is True
    model.make_train_function(force=True)
    traces = Traces(monkeypatch, model)
    fit3(model)
    assert int(model.optimizer.iterations.numpy()) == 6
    assert counted_step(logger) == 2 and traces.count == 0
    # The logger's next `fit` hands the request back: counted again.
    fit3(model, callbacks=[logger])
    assert traces.count > 0 and counted_step(logger) == 8
    assert logged_steps(tmp_path) == [0, 1, 2, 6, 7, 8]


# An unwritable `log_dir`, and a `fit` that raises.


def test_unwritable_log_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    log_dir = blocker / "logs"  # under a regular file: unwritable, even as root
    model = counting_model()
    fit3(model)
    plain = model.train_function
    steps = int(model.optimizer.iterations.numpy())
    with pytest.raises(ValueError) as info:
        fit3(model, callbacks=[GradientHistogramLogger(log_dir)])
    message = str(info.value)
    assert "cannot write its event files to `log_dir`" in message
    assert message.endswith(f"Received: log_dir={log_dir!r}")
    assert int(model.optimizer.iterations.numpy()) == steps  # no step ran
    # Nothing was asked of the optimizer; the train function is untouched.
    assert model.optimizer.record_gradient_histograms(None) is False
    assert model.train_function is plain


class RaiseOnBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            raise RuntimeError("callback failed")


def failing_batches():
    """Three batches, then an error that surfaces inside the train function."""
    x, y = data()
    for i in range(3):
        yield x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]
    raise RuntimeError("no batch 3")


@pytest.mark.parametrize("where", ["step", "logger", "other_callback"])
def test_fit_that_raises_leaves_request_and_model_usable(tmp_path, monkeypatch, where):
    closed = []
    close = histogram._Writer.close
    monkeypatch.setattr(
        histogram._Writer, "close", lambda self: closed.append(self) or close(self)
    )
    model = counting_model()
    opt = model.optimizer
    logger = GradientHistogramLogger(tmp_path, freq=1)
    if where == "step":
        with pytest.raises(Exception, match="no batch 3"):
            model.fit(failing_batches(), epochs=1, shuffle=False, verbose=0,
                      callbacks=[logger])
    elif where == "logger":
        with monkeypatch.context() as patch:
            patch.setattr(histogram._Writer, "write",
                          lambda *args: (_ for _ in ()).throw(OSError("disk full")))
            with pytest.raises(OSError, match="disk full"):
                fit3(model, callbacks=[logger])
    else:
        with pytest.raises(RuntimeError, match="callback failed"):
            fit3(model, callbacks=[logger, RaiseOnBatch()])
    steps = int(opt.iterations.numpy())
    assert steps >= 1
    # Keras skipped `on_train_end`: the request stays, the writer is open.
    request, writer = logger._histograms, logger._writer_
    assert opt.record_gradient_histograms(request) is False
    assert writer is not None and writer not in closed

    # Another `fit` without the logger trains (and the step still counts).
    fit3(model)
    assert int(opt.iterations.numpy()) == steps + 3
    assert counted_step(logger) == steps + 2
    assert writer not in closed

    # The logger's next `fit` closes the writer first, then logs as usual.
    train_function = model.train_function
    fit3(model, callbacks=[logger])
    assert closed[0] is writer
    assert logger._writer_ is None and len(closed) == 2
    assert model.train_function is train_function  # the same request
    assert logged_steps(tmp_path)[-3:] == [steps + 3, steps + 4, steps + 5]
    assert np.all(np.isfinite(model.get_weights()[0]))


@pytest.mark.tensorflow(reason="steps_per_execution > 1 (Keras's torch trainer refuses it)")
@pytest.mark.jax
def test_fit_steps_per_execution_writes_the_logged_step(tmp_path):
    model = functional_model()
    model.compile(optimizer=kc.ClippedSGD(0.01), loss="mse", steps_per_execution=4)
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[GradientHistogramLogger(tmp_path, freq=3)])
    acc = read_run(tmp_path)
    # Executions [0-3] [4-7] [8-11]: logged steps 0, 3 | 6 | 9, the last kept.
    assert [s for s, _ in series(acc, "gradients/hidden")] == [3, 6, 9]
    # The statistics are those of the execution's last step.
    assert [s for s, _ in series(acc, "gradient_stats/grad_norm")] == [3, 7, 11]


def test_the_logger_reads_only_when_a_count_can_be_new(tmp_path, monkeypatch):
    # A read after every batch cost 6-8% of a 5 ms step: the logger reads
    # after the fewest batches in which the next counted update can run.
    reads = []
    read = stats.GradientHistograms.read
    monkeypatch.setattr(
        stats.GradientHistograms, "read", lambda self: reads.append(1) or read(self)
    )
    model = functional_model()
    model.compile(optimizer=kc.ClippedSGD(0.01), loss="mse")
    x, y = data(n=250)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0,
              callbacks=[GradientHistogramLogger(tmp_path, freq=100)])
    # Reads: at the start, after updates 0, 100 and 200, and at the end.
    assert len(reads) == 5
    assert [s for s, _ in series(read_run(tmp_path), "gradients/hidden")] == [0, 100, 200]


def test_fit_loss_scale_optimizer_and_sparse_gradients(tmp_path):
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(50, 3, name="embed")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    opt = keras.optimizers.LossScaleOptimizer(kc.ClippedSGD(0.1, global_clipnorm=1.0))
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (16, 4)).astype("int32")  # rows 10..49 unused
    y = rng.standard_normal((16, 1)).astype("float32")
    model.fit(ids, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[GradientHistogramLogger(tmp_path, freq=1)])
    acc = read_run(tmp_path)
    for step, buckets in series(acc, "gradients/embed"):
        zeros = dict(series(acc, "gradient_zero_fraction/embed"))[step]
        # The absent rows count as zeros: the layer's size is accounted for.
        assert round(float(zeros) * 150) >= 40 * 3
        assert buckets[:, 2].sum() + round(float(zeros) * 150) == 150
    assert [s for s, _ in series(acc, "gradients/head")] == [0, 1]


# A real TensorBoard server.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_tensorboard_server_serves_histograms_and_scalars(tmp_path):
    log_dir = tmp_path / "logs"
    model = functional_model()
    model.compile(optimizer=kc.ClippedAdam(0.01, global_clipnorm=1.0), loss="mse")
    x, y = data()
    logger = GradientHistogramLogger(log_dir, freq=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    expected = series(read_run(log_dir), "gradients/hidden")

    port = free_port()
    out = open(tmp_path / "tensorboard.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        deadline = time.monotonic() + 60
        tags = {}
        while time.monotonic() < deadline and server.poll() is None:
            try:
                tags = get_json(port, "/data/plugin/histograms/tags")
            except OSError:
                pass
            if {"gradients/hidden", "gradients/head"} <= set(tags.get("train", {})):
                break
            time.sleep(0.5)
        out.seek(0)
        assert set(tags.get("train", {})) == {"gradients/hidden", "gradients/head"}, (
            f"no histograms from TensorBoard within 60 s; its output:\n{out.read()}"
        )
        scalars = set(get_json(port, "/data/plugin/scalars/tags")["train"])
        assert {
            "gradient_stats/grad_norm", "gradient_stats/clipped_grad_norm",
            "gradient_stats/clip_rate", "gradient_stats/clip_threshold",
            "gradient_norms/hidden", "gradient_zero_fraction/hidden",
            "gradient_nonfinite/head",
        } <= scalars
        served = get_json(
            port, "/data/plugin/histograms/histograms", run="train", tag="gradients/hidden"
        )
        assert [point[1] for point in served] == [s for s, _ in expected] == [0, 2, 4]
        for (_, step, buckets), (_, written) in zip(served, expected):
            np.testing.assert_array_equal(np.array(buckets), written)
            assert sum(b[2] for b in buckets) <= 16
        norms = get_json(
            port, "/data/plugin/scalars/scalars", run="train", tag="gradient_stats/grad_norm"
        )
        assert [point[1] for point in norms] == [0, 2, 4]
        assert all(point[2] > 0 for point in norms)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        out.close()
