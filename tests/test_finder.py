"""suggest_threshold: exact norms, NumPy percentiles, state left as it was, the CLI."""

import re
import sys

import keras
import numpy as np
import pytest

import keras_clip as kc
from keras_clip import __main__ as cli
from keras_clip.finder import PERCENTILES

U = 2.0**-24  # float32 unit roundoff


def linear_model(bias=True):
    model = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(
            1, use_bias=bias, kernel_initializer="zeros", bias_initializer="zeros",
            name="dense",
        ),
    ], name="linear")  # named: auto names depend on what the process built before
    return model


def pythagorean_data(ks):
    """Batches of 2 rows, `x = I`, `y = (-3k, 4k)`: at zero weights, mse gives
    the gradients `kernel = (3k, -4k)` (norm 5k) and `bias = -k` (norm k)."""
    ks = np.asarray(ks, "float64")
    x = np.tile(np.eye(2), (len(ks), 1)).astype("float32")
    y = np.stack([-3 * ks, 4 * ks], 1).reshape(-1, 1).astype("float32")
    return x, y


def zero_weight_gradients(x, y, batch):
    """NumPy: the mse gradients of a zero-weight Dense(1) on each batch.

    `d loss / d pred = 2 (pred - y) / batch = -2 y / batch`, so the kernel's
    gradient is `x^T (-2 y / batch)` and the bias's the sum of `-2 y / batch`.
    """
    out = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch].astype("float64")
        r = -2.0 * y[start:start + batch].astype("float64") / batch
        out.append((xb.T @ r, r.sum(0)))
    return out


def state(model):
    """Every model, metric and optimizer variable, in order: (dtype, shape, bytes)."""
    variables = [
        *model.variables, *model.metrics_variables, *model.optimizer.variables
    ]
    out = []
    for v in variables:
        value = np.asarray(keras.ops.convert_to_numpy(v.value))
        out.append((value.dtype.str, value.shape, value.tobytes()))
    return out


# The norms and the suggestions, exactly.


def test_exact_norms_percentiles_and_suggestions_on_a_linear_model():
    ks = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    x, y = pythagorean_data(ks)
    model = linear_model()
    # Learning rate 0: the weights stay zero, so every step's gradient is the
    # closed form above.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    report = kc.suggest_threshold(
        model, (x, y), steps=20, batch_size=2, shuffle=False, verbose=0
    )
    grads = zero_weight_gradients(x, y, 2) * 2  # 10 batches, cycled: 20 steps
    kernel = np.array([np.linalg.norm(g) for g, _ in grads])
    bias = np.array([np.linalg.norm(b) for _, b in grads])
    np.testing.assert_array_equal(kernel, 5 * np.array(ks * 2))
    np.testing.assert_array_equal(bias, np.array(ks * 2))
    # Every gradient element is a small integer (exact in float32), and so is
    # the kernel's sum of squares (25 k^2): its norm 5k is exact. The global
    # norm sqrt(26 k^2) is one rounding of a sqrt: within U relative.
    assert report.steps == 20 and report.norms.shape == (20,)
    assert report.variables == ["linear/dense/kernel", "linear/dense/bias"]
    np.testing.assert_array_equal(report.variable_sizes, [2, 1])
    np.testing.assert_array_equal(report.variable_norms, np.stack([kernel, bias], 1))
    reference = np.sqrt(kernel**2 + bias**2)
    np.testing.assert_allclose(report.norms, reference, rtol=U, atol=0)
    assert report.nonfinite_steps == 0 and report.finite.all()
    # A percentile interpolates two neighbours linearly: the same relative
    # error as the norms (float64 interpolation adds ~1e-16).
    assert list(report.percentiles) == list(PERCENTILES)
    for p, value in report.percentiles.items():
        np.testing.assert_allclose(value, np.percentile(reference, p), rtol=U + 1e-15)
    # The rules, each against NumPy on the report's own recorded norms.
    assert report.suggested == report.suggestions["global_norm"]
    assert report.suggested == np.percentile(report.norms, 90)
    step_max = report.variable_norms.max(1)  # the kernel's 5k
    rms = report.variable_norms / np.sqrt([2.0, 1.0])
    assert report.suggestions["norm"] == np.percentile(step_max, 90)
    assert report.suggestions["value"] == np.percentile(rms.max(1), 90)
    assert report.per_variable == {
        "linear/dense/kernel": np.percentile(kernel, 90),
        "linear/dense/bias": np.percentile(bias, 90),
    }
    # The k = 9 steps (2 of 20) lie above every 90th percentile here.
    assert report.clip_fraction["global_norm"] == np.mean(
        reference > np.percentile(reference, 90)
    ) == 0.1
    assert report.clip_fraction["norm"] == np.mean(step_max > report.suggestions["norm"])
    low, high = report.clip_fraction["value"]
    value = report.suggestions["value"]
    assert low == np.mean(rms.max(1) > value) == 0.1
    assert high == np.mean(step_max > value) and high > low  # 5k > 5k/sqrt(2)


@pytest.mark.parametrize("percentile", [0.5, 50.0, 90.0, 99.5, 100.0])
def test_suggestions_are_numpys_percentiles_of_the_recorded_norms(percentile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 1)) * 4).astype("float32")
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    report = kc.suggest_threshold(
        model, (x, y), steps=15, percentile=percentile, batch_size=16, verbose=0
    )
    norms, per = report.norms, report.variable_norms
    assert len(set(norms)) == 15  # the steps moved the weights
    sizes = np.array([v.size for v in model.get_weights()])
    np.testing.assert_array_equal(report.variable_sizes, sizes)
    statistic = {
        "global_norm": norms,
        "norm": per.max(1),
        "value": (per / np.sqrt(sizes)).max(1),
    }
    for kind, values in statistic.items():
        threshold = np.percentile(values, percentile)
        assert report.suggestions[kind] == threshold
        share = np.mean(values > threshold)
        if kind == "value":
            assert report.clip_fraction[kind] == (share, np.mean(per.max(1) > threshold))
        else:
            assert report.clip_fraction[kind] == share
    for i, path in enumerate(report.variables):
        assert report.per_variable[path] == np.percentile(per[:, i], percentile)
    assert report.percentiles == {p: np.percentile(norms, p) for p in PERCENTILES}
    # The global norm is the root of the per-variable squares (float32 sums).
    np.testing.assert_allclose(norms, np.sqrt((per**2).sum(1)), rtol=8 * U)


def test_steps_continue_the_optimizers_own_trajectory():
    """A plain SGD with momentum, stepped before and with its learning rate
    changed since compile: the measured steps use its slots, iterations and
    learning rate, so the norms follow the NumPy trajectory that continues it.
    """
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (18, 2)).astype("float32")
    y = rng.integers(-4, 5, (18, 1)).astype("float32")
    model = linear_model()
    optimizer = keras.optimizers.SGD(0.5, momentum=0.5)
    model.compile(optimizer=optimizer, loss="mse")
    for step in range(3):  # the same traced step the measurement runs
        model.train_on_batch(x[2 * step:2 * step + 2], y[2 * step:2 * step + 2])
    optimizer.learning_rate = 0.25
    report = kc.suggest_threshold(
        model, (x[6:], y[6:]), steps=6, batch_size=2, shuffle=False, verbose=0
    )
    # NumPy, from the start: w <- w + m, m <- momentum m - lr g.
    w, b = np.zeros((2, 1)), np.zeros(1)
    mw, mb = np.zeros((2, 1)), np.zeros(1)
    expected = []
    for step in range(9):
        xb, yb = x[2 * step:2 * step + 2], y[2 * step:2 * step + 2]
        r = 2.0 * (xb @ w + b - yb) / 2
        gw, gb = xb.T @ r, r.sum(0)
        if step >= 3:
            expected.append((gw, gb))
        lr = 0.5 if step < 3 else 0.25
        mw, mb = 0.5 * mw - lr * gw, 0.5 * mb - lr * gb
        w, b = w + mw, b + mb
        # Every value is a dyadic rational of few bits, exact in float32: the
        # float32 step computes exactly these values in any order.
        for value in (r, gw, gb, mw, mb, w, b):
            assert np.array_equal(value.astype("float32"), value)
    kernel = np.array([np.linalg.norm(gw) for gw, _ in expected])
    bias = np.array([abs(gb[0]) for _, gb in expected])
    # Only the norms round: the kernel's two squares and their sum (2 U) and
    # the sqrt (U, plus half of the sum's); the global norm sums three squares.
    np.testing.assert_array_equal(report.variable_norms[:, 1], bias)
    np.testing.assert_allclose(report.variable_norms[:, 0], kernel, rtol=3 * U)
    np.testing.assert_allclose(
        report.norms, np.sqrt(kernel**2 + bias**2), rtol=4 * U
    )
    # Fresh slots and a reset learning rate would have given other norms.
    assert len(set(report.norms)) == 6


# The state is left as it was.


def twin_model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(
        8, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(3)
    )(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.3, seed=5)(h)
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(4)
    )(h)
    return keras.Model(inputs, outputs)


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "clipped_adam_autoclip": lambda: kc.ClippedAdam(
        0.01, clipper=kc.AutoClip(percentile=50.0, history_size=8)
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weights_and_optimizer_state_are_bit_identical_afterwards(name):
    import tensorflow as tf  # tf.data: an input Keras takes on every backend

    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = (x.sum(1, keepdims=True) + 0.1).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    a, b = twin_model(), twin_model()
    for model in (a, b):
        model.compile(optimizer=OPTIMIZERS[name](), loss="mse", metrics=["mae"])
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)  # 4 steps
    before = state(a)
    assert before == state(b)
    optimizer, train_function = a.optimizer, a.train_function
    slots = [v for v in optimizer.variables if "momentum" in v.path]
    assert slots and all(np.any(keras.ops.convert_to_numpy(v)) for v in slots)
    if name == "clipped_adam_autoclip":
        (count,) = [v for v in optimizer.variables if v.path.endswith("clip_count")]
        assert int(keras.ops.convert_to_numpy(count)) == 4

    report = kc.suggest_threshold(a, data, steps=9, verbose=0)

    assert report.norms.size == 9 and report.finite.all()
    assert state(a) == before
    assert a.optimizer is optimizer and a.train_function is train_function
    # Training goes on as if nothing had happened: the train function, the
    # dropout seeds, BatchNormalization's statistics, the AutoClip history.
    for model in (a, b):
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    assert state(a) == state(b)


def test_state_is_restored_when_a_step_raises():
    import tensorflow as tf  # tf.data: an input Keras takes on every backend

    x = np.ones((8, 2), "float32")
    model = linear_model()
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    model.fit(x, np.ones((8, 1), "float32"), verbose=0)
    before, optimizer = state(model), model.optimizer

    def batches():
        yield x, np.ones((8, 1), "float32")
        yield np.ones((8, 5), "float32"), np.ones((8, 1), "float32")  # 5 features

    data = tf.data.Dataset.from_generator(
        batches,
        output_signature=(
            tf.TensorSpec((8, None), "float32"), tf.TensorSpec((8, 1), "float32")
        ),
    )
    # TensorFlow's traced step fails in the matmul; on JAX and torch, Keras
    # checks the input's shape against the layer's first.
    if keras.backend.backend() == "tensorflow":
        error = tf.errors.InvalidArgumentError
    else:
        error = ValueError
    with pytest.raises(error):
        kc.suggest_threshold(model, data, steps=3, verbose=0)
    assert model.optimizer is optimizer
    assert state(model) == before


def test_mixed_precision_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = x.sum(1, keepdims=True).astype("float32")
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=16, verbose=0)
    before = state(model)
    report = kc.suggest_threshold(model, (x, y), steps=30, batch_size=16, verbose=0)
    assert state(model) == before
    # The loss scale starts at 2**15 and halves on each overflowing step,
    # which never reaches the inner optimizer: no norm is recorded for it.
    assert 0 < report.norms.size <= 30 and report.finite.all()
    assert isinstance(report.optimizer(), kc.ClippedAdam)


def test_gradient_accumulation_records_one_norm_per_update():
    x, y = pythagorean_data([1, 2, 3, 4, 5, 6])
    model = linear_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.0, gradient_accumulation_steps=3), loss="mse"
    )
    report = kc.suggest_threshold(
        model, (x, y), steps=6, batch_size=2, shuffle=False, verbose=0
    )
    # Each update applies the mean of 3 batches' gradients: k = 2 and 5.
    assert report.steps == 6
    np.testing.assert_array_equal(report.variable_norms, [[10.0, 2.0], [25.0, 5.0]])


# Non-finite gradients.


@pytest.mark.parametrize(
    "make",
    [lambda: keras.optimizers.SGD(0.1), lambda: kc.ClippedSGD(0.1, nonfinite="propagate")],
    ids=["plain", "propagate"],
)
def test_nonfinite_from_the_start_gives_no_threshold(make):
    x = np.full((32, 2), np.nan, "float32")
    y = np.ones((32, 1), "float32")
    model = linear_model()
    model.compile(optimizer=make(), loss="mse")
    report = kc.suggest_threshold(model, (x, y), steps=5, batch_size=8, verbose=0)
    assert report.nonfinite_steps == 5 and not report.finite.any()
    assert report.suggested is None
    assert report.suggestions == dict.fromkeys(("global_norm", "norm", "value"))
    assert report.clip_fraction == dict.fromkeys(("global_norm", "norm", "value"))
    assert report.percentiles == {}
    assert set(report.per_variable.values()) == {None}
    text = str(report)
    assert "all 5 steps had non-finite gradients" in text
    assert "Clip(" not in text and "nan" not in text  # no threshold, no NaN
    with pytest.raises(ValueError, match="all 5 steps had non-finite gradients"):
        report.optimizer()


def test_nonfinite_steps_are_left_out_and_counted():
    x, y = pythagorean_data([1, 2, 3, 4, 5, 6, 7, 8])
    y[4:6] = np.inf  # the third batch
    model = linear_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    report = kc.suggest_threshold(
        model, (x, y), steps=8, batch_size=2, shuffle=False, verbose=0
    )
    assert report.nonfinite_steps == 1
    np.testing.assert_array_equal(report.finite, [1, 1, 0, 1, 1, 1, 1, 1])
    finite = report.norms[report.finite]
    assert report.suggested == np.percentile(finite, 90)
    assert report.percentiles[100] == finite.max()
    assert report.clip_fraction["global_norm"] == 1 / 7
    assert "1 non-finite, left out" in str(report)


# Data.


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch):
        super().__init__()
        self.x, self.y, self.batch, self.epochs_ended = x, y, batch, 0

    def __len__(self):
        return len(self.x) // self.batch

    def __getitem__(self, i):
        s = slice(i * self.batch, (i + 1) * self.batch)
        return self.x[s], self.y[s]

    def on_epoch_end(self):
        self.epochs_ended += 1


def test_datasets_are_cycled_in_order():
    import tensorflow as tf  # tf.data: an input Keras takes on every backend

    ks = [1, 2, 3]
    x, y = pythagorean_data(ks)
    expected = 5.0 * np.array(ks * 3)[:7]  # the kernel's norms, cycled
    pydataset = Batches(x, y, 2)
    for data, kwargs in [
        ((x, y), {"batch_size": 2, "shuffle": False}),
        (tf.data.Dataset.from_tensor_slices((x, y)).batch(2), {}),
        (pydataset, {}),
    ]:
        model = linear_model()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        report = kc.suggest_threshold(model, data, steps=7, verbose=0, **kwargs)
        np.testing.assert_array_equal(report.variable_norms[:, 0], expected)
    assert pydataset.epochs_ended == 2


@pytest.mark.tensorflow
@pytest.mark.jax(reason="Keras on torch requires steps_per_execution=1")
def test_steps_per_execution_still_records_every_step():
    import tensorflow as tf  # tf.data: an input Keras takes on every backend

    x, y = pythagorean_data([1, 2, 3, 4, 5, 6])
    model = linear_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", steps_per_execution=4)
    model.fit(x, y, batch_size=2, verbose=0)
    report = kc.suggest_threshold(
        model, tf.data.Dataset.from_tensor_slices((x, y)).batch(2), steps=6, verbose=0
    )
    np.testing.assert_array_equal(report.variable_norms[:, 0], [5, 10, 15, 20, 25, 30])


def test_arrays_are_shuffled_with_numpys_generator():
    x, y = pythagorean_data(range(1, 9))
    model = linear_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    np.random.seed(7)
    report = kc.suggest_threshold(model, (x, y), steps=4, batch_size=4, verbose=0)
    np.random.seed(7)
    order = np.random.permutation(16)
    expected = [
        np.linalg.norm(g) for g, _ in zero_weight_gradients(x[order], y[order], 4)
    ]
    np.testing.assert_allclose(report.variable_norms[:, 0], expected, rtol=3 * U)


def test_a_model_and_optimizer_not_built_yet():
    x, y = pythagorean_data([1, 2])
    model = keras.Sequential([keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    assert not model.built and not model.optimizer.built
    report = kc.suggest_threshold(
        model, (x, y), steps=2, batch_size=2, shuffle=False, verbose=0
    )
    np.testing.assert_array_equal(report.variable_norms[:, 0], [5.0, 10.0])
    assert model.built
    np.testing.assert_array_equal(model.get_weights()[0], np.zeros((2, 1)))


# The report.


def small_report(optimizer=None):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 3)).astype("float32")
    y = x.sum(1, keepdims=True).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss="mse")
    return kc.suggest_threshold(model, (x, y), steps=12, batch_size=8, verbose=0)


def test_report_text():
    report = small_report()
    text = str(report)
    assert text.startswith("Gradient norms (before clipping) of 12 optimizer steps.")
    assert "percentile   5 " in text and "max" in text
    assert f"GlobalNormClip({report.suggested:.4g})" in text
    assert f"NormClip({report.suggestions['norm']:.4g})" in text
    assert f"ValueClip({report.suggestions['value']:.4g})" in text
    assert report.variables[0].endswith("kernel")
    assert report.variables[0] in text and "AutoClip(percentile=90)" in text
    assert repr(report).startswith("<ThresholdReport steps=12 recorded=12")


def test_report_optimizer_and_clipper():
    report = small_report(keras.optimizers.Adam(0.01, beta_1=0.8, clipnorm=3.0))
    opt = report.optimizer(kind="global_norm", learning_rate=1e-4)
    assert type(opt) is kc.ClippedAdam
    assert isinstance(opt.clipper, kc.GlobalNormClip)
    assert opt.clipper.max_norm == report.suggested
    assert opt.beta_1 == 0.8 and opt.clipnorm is None
    np.testing.assert_allclose(float(opt.learning_rate), 1e-4)
    assert report.optimizer(kind="norm").clipnorm == report.suggestions["norm"]
    assert report.optimizer(kind="value").clipvalue == report.suggestions["value"]
    assert report.clipper("value").max_value == report.suggestions["value"]
    with pytest.raises(ValueError, match=r"Received: kind='autoclip'$"):
        report.optimizer(kind="autoclip")
    with pytest.raises(ValueError, match=r"choose it with `kind`. Received: clipnorm=1.0$"):
        report.optimizer(clipnorm=1.0)
    # A keras-clip optimizer keeps its class and its other settings.
    report = small_report(kc.ClippedRMSprop(0.01, clipper="zclip", nonfinite="zero"))
    opt = report.optimizer(kind="norm")
    assert type(opt) is kc.ClippedRMSprop and opt.nonfinite == "zero"
    assert isinstance(opt.clipper, kc.NormClip)


def test_plot_makes_a_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    report = small_report()
    fig = report.plot()
    assert isinstance(fig, matplotlib.figure.Figure)
    left, right = fig.axes
    assert left.get_yscale() == "log" and right.get_xscale() == "log"
    marked = [line.get_ydata()[0] for line in left.get_lines()[1:]]
    assert marked == [report.suggested]
    plt.close(fig)
    # Without a finite step: the non-finite steps, no threshold, the reason.
    model = linear_model()
    model.compile(optimizer="sgd", loss="mse")
    x = np.full((8, 2), np.nan, "float32")
    report = kc.suggest_threshold(model, (x, x[:, :1]), steps=3, verbose=0)
    fig = report.plot()
    left = fig.axes[0]
    assert [len(line.get_xdata()) for line in left.get_lines()] == [0, 3]
    assert "all 3 steps had non-finite gradients" in left.get_title()
    plt.close(fig)


def test_plot_without_matplotlib_names_the_install(monkeypatch):
    report = small_report()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"`pip install matplotlib`"):
        report.plot()


def test_progress_bar(capsys):
    small_report()
    assert capsys.readouterr().out == ""
    x = np.ones((8, 3), "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    kc.suggest_threshold(model, (x, x[:, :1]), steps=3, verbose=1)
    out = capsys.readouterr().out
    assert "3/3" in out and "grad_norm" in out


# Arguments.


def compiled_model():
    model = linear_model()
    model.compile(optimizer="adam", loss="mse")
    return model


XY = (np.ones((4, 2), "float32"), np.ones((4, 1), "float32"))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": "model"}, TypeError, "`model` must be a `keras.Model`. Received: model='model'"),
        ({"model": "uncompiled"}, ValueError, "must be compiled with a loss and an optimizer first"),
        ({"steps": 0}, ValueError, "`steps` must be in [1, inf]. Received: steps=0"),
        ({"steps": 2.5}, TypeError, "`steps` must be an integer. Received: steps=2.5"),
        ({"percentile": 0}, ValueError, "`percentile` must be in (0, 100]. Received: percentile=0"),
        ({"percentile": 101}, ValueError, "Received: percentile=101"),
        ({"percentile": float("nan")}, ValueError, "must be finite. Received: percentile=nan"),
        ({"percentile": "90"}, TypeError, "`percentile` must be a number in (0, 100]. Received: percentile='90'"),
        ({"data": {"x": 1}}, TypeError, "a `keras.utils.PyDataset`. Received: data={'x': 1}"),
        ({"data": "x"}, TypeError, "Received: data='x'"),
        ({"data": XY * 2}, ValueError, "Received: data=a tuple of 4 elements"),
        ({"data": (XY[0], XY[1][:3])}, ValueError, "Received: data=arrays with first dimensions [3, 4]"),
        ({"batch_size": 0}, ValueError, "Received: batch_size=0"),
        ({"shuffle": "yes"}, TypeError, "`shuffle` must be a bool. Received: shuffle='yes'"),
        ({"verbose": 3}, ValueError, '`verbose` must be "auto", 0, 1 or 2. Received: verbose=3'),
    ],
)
def test_bad_arguments_fail_at_the_call(kwargs, error, message):
    args = {"model": compiled_model(), "data": XY, "steps": 2, "verbose": 0}
    args.update(kwargs)
    if args["model"] == "uncompiled":
        args["model"] = linear_model()
    with pytest.raises(error) as info:
        kc.suggest_threshold(**args)
    text = str(info.value)
    assert message in text
    assert re.search(r"Received: [\w.]+=[^\n]+$", text)  # ends with it


def test_bad_datasets():
    import tensorflow as tf  # tf.data: an input Keras takes on every backend

    model = compiled_model()
    with pytest.raises(ValueError, match=r"batched already. Received: batch_size=4$"):
        kc.suggest_threshold(
            model, tf.data.Dataset.from_tensor_slices(XY).batch(2), batch_size=4
        )
    empty = tf.data.Dataset.from_tensor_slices(XY).take(0)
    with pytest.raises(ValueError, match=r"`data` yielded no batch"):
        kc.suggest_threshold(model, empty, verbose=0)
    unlabeled = tf.data.Dataset.from_tensor_slices(XY[0]).batch(2)
    with pytest.raises(ValueError, match=r"must be `\(x, y\)` or"):
        kc.suggest_threshold(model, unlabeled, verbose=0)


def test_multi_optimizer_is_refused():
    if not hasattr(keras.optimizers, "MultiOptimizer"):
        pytest.skip("no MultiOptimizer in this Keras")
    model = linear_model()
    model.compile(
        optimizer=keras.optimizers.MultiOptimizer(
            [(keras.optimizers.SGD(), model.layers)]
        ),
        loss="mse",
    )
    with pytest.raises(TypeError, match="does not support `MultiOptimizer`"):
        kc.suggest_threshold(model, XY, verbose=0)


# The command line.


def test_suggest_command(capsys):
    assert cli.main(["suggest", "--steps", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps" in out and "6/6" in out
    assert "Suggested thresholds" in out or "No suggestion" in out


def test_suggest_command_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["suggest", "--steps", "0"])
    with pytest.raises(SystemExit):
        cli.main(["suggest", "--percentile", "0"])
