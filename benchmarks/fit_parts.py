"""Parts (e), (f) and (g) of `run.py`: what users see in `fit`.

(e) the `fit` step of two many-variable models (`FIT_MODELS`), with XLA
    on and off, each configuration as several models with the same seed
    weights, timed in interleaved rounds as in (a);
(f) the first `fit` call of each of those models (trace, compile, first
    step), measured while building them;
(g) the callbacks' cost on a fast step (`FAST_MODEL`).

A `fit` step is timed from one batch's `on_train_batch_begin` to the next
batch's (`_batch_clock`): every callback's work for a batch lies in between.
Backend-neutral (Keras only): `run.py --backend jax` runs (e, f) on JAX.
Run through `run.py`, not on its own.
"""

import collections
import functools
import gc
import tempfile
import time

import numpy as np
from run import (
    ADAM_AGAIN,
    FIT_FLOOR,
    FIT_FLOOR_AGC,
    QUIET,
    _guarded_adam,
    _interval,
    _optimizer,
    _rounds,
    _summary,
    _timed_batch_end,
)

FitModel = collections.namedtuple("FitModel", "describe build shape batch")


def _mlp():
    import keras

    return keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="relu") for _ in range(40)]
        + [keras.layers.Dense(1)]
    )


def _transformer(blocks=4, width=128, heads=4, key_dim=32, hidden=512):
    """A small Transformer encoder on float features (no embedding)."""
    import keras
    from keras import layers

    inputs = keras.Input((32, width))
    h = inputs
    for _ in range(blocks):
        attended = layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim)(h, h)
        h = layers.LayerNormalization()(h + attended)
        fed = layers.Dense(hidden, activation="relu")(h)
        h = layers.LayerNormalization()(h + layers.Dense(width)(fed))
    h = layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, layers.Dense(1)(h))


FIT_MODELS = {
    "mlp": FitModel(
        "mlp: 40 x Dense(64, relu) + Dense(1), 64 features, batch 64, mse "
        "(82 variables, 166K parameters)", _mlp, (64,), 64),
    "transformer": FitModel(
        "transformer: 4 encoder blocks (MultiHeadAttention(4 heads x 32), "
        "Dense(512, relu)-Dense(128), residuals, LayerNormalization), "
        "GlobalAveragePooling1D, Dense(1); sequences of 32 x 128, batch 32, mse "
        "(66 variables, 793K parameters)", _transformer, (32, 128), 32),
}
# (g): a model whose step takes about 5 ms here (Zen 4, 2 cores, XLA): on a
# quiet machine, Adam's `fit` step 4.1-4.5 ms, `ClippedAdam(global_clipnorm=1.0)`'s
# 4.4-4.8 ms (3 x Dense(256): 3.4-4.3 ms); 6.5-7.5 ms with other work on the cores.
FAST_MODEL = FitModel(
    "4 x Dense(256, relu) + Dense(1), 256 features, batch 256, mse, "
    "default jit_compile (XLA), kc.ClippedAdam(1e-3, global_clipnorm=1.0)",
    lambda: _dense_stack(4, 256, 256), (256,), 256)


def _dense_stack(layers, width, features):
    import keras

    return keras.Sequential(
        [keras.Input((features,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(layers)]
        + [keras.layers.Dense(1)]
    )


def _data(spec, batches, seed=0):
    rng = np.random.default_rng(seed)
    n = spec.batch * batches
    x = rng.standard_normal((n, *spec.shape)).astype("float32")
    y = rng.standard_normal((n, 1)).astype("float32")
    return x, y


def _batch_clock():
    """A Keras callback noting the time at each `on_train_batch_begin`.

    It has an `on_train_batch_end` (doing nothing), as the progress bar and
    most callbacks do: Keras then runs every callback's batch end in the
    main thread, after reading the step's loss, so each step has ended when
    the next begins. (Without one, Keras-JAX's `fit` runs batch ends in a
    thread and dispatches the next step at once: a batch's interval is then
    the host's dispatch, and the steps' work waits until the epoch's end.)
    """
    import keras

    class BatchClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.begins = []

        def on_train_batch_begin(self, batch, logs=None):
            self.begins.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            pass

    return BatchClock()


def _fit_step(model, x, y, batch, callbacks=()):
    """The step time of one `fit` call over `x, y`, in seconds.

    The median over the `len(x) / batch - 2` batches after the first of the
    time from a batch's begin to the next one's (`_batch_clock`): every
    callback's work lies in between. The first batch holds `fit`'s setup
    and any retrace.
    """
    clock = _batch_clock()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False,
              callbacks=[*callbacks, clock])
    return float(np.median(np.diff(clock.begins)[1:]))


def _batch_step(model, x, y, calls):
    """The step time of `calls - 1` `train_on_batch` calls on one batch, in
    seconds (their mean, after one left out).

    `train_on_batch` runs the compiled step `fit` runs, one batch at a time,
    and returns its loss as a number (so the step has ended). `x, y` are
    backend tensors: converting them is not part of the step.
    """
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def _first_fit(model, x, y, batch):
    """The wall time of the model's first `fit` call, on one batch, in seconds.

    With the objects made before it frozen (`gc.freeze`): a tracing `fit`
    makes many, and Python's full collections in it would otherwise walk
    every model built before (those (e) keeps), more for each model built.
    """
    gc.collect()
    gc.freeze()
    try:
        start = time.perf_counter()
        model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)
        return time.perf_counter() - start
    finally:
        gc.unfreeze()


def _compiled(spec, label, jit_compile):
    import keras

    keras.utils.set_random_seed(0)  # the same weights for every model
    model = spec.build()
    if label in (FIT_FLOOR, FIT_FLOOR_AGC):
        optimizer = _guarded_adam(weight_norms=label == FIT_FLOOR_AGC)
    else:
        optimizer = _optimizer("Adam" if label == ADAM_AGAIN else label)
    model.compile(optimizer, "mse", jit_compile=jit_compile)
    if label in (FIT_FLOOR, FIT_FLOOR_AGC):
        # Built before the first trace, as keras-clip's are: Keras's
        # TensorFlow `fit` traces its step twice when the optimizer creates
        # its variables in the first trace (Adam's does), so (f)'s least
        # programs compare with keras-clip's one trace, not Adam's two.
        optimizer.build(model.trainable_variables)
    return model


def part_ef(spec, jit_compile, labels, instances, rounds, steps, protocol="batch"):
    """(e) and (f) for one model and one `jit_compile`.

    Builds `instances` compiled models per configuration (the same seed
    weights), one of each configuration in a fresh random order, then the
    next; the first `fit` call of each, on one batch, is (f)'s time (a
    throwaway Adam model goes first: the first model of a kind pays the
    process's one-time costs). Then, for (e) (when `rounds`), each model is
    warmed once, and every round times every model, its configurations in
    a fresh random order; a configuration's round time is the mean over its
    models. With `protocol="batch"` a model's time in a round is `steps`
    `train_on_batch` calls after one left out (`_batch_step`): every model
    runs within a second of every other, so the machine's slow spells,
    which last longer, hit a round's configurations alike. With `"fit"` it
    is one `fit` of `steps` steps (`_fit_step`): `fit`'s own loop, but a
    round lasts several seconds, and single rounds of a 6 ms step ranged
    from 0.5 to 2.3 times their median.

    Returns the (e) rows (None without `rounds`) and the (f) rows, ratios
    to Adam's (round by round for (e), model by model for (f)).
    """
    import keras

    x, y = _data(spec, steps + 2)
    _first_fit(_compiled(spec, "Adam", jit_compile), x, y, spec.batch)
    models = {label: [] for label in labels}
    first = {label: [] for label in labels}
    order = list(labels)
    rng = np.random.default_rng(1)
    for _ in range(instances):
        rng.shuffle(order)
        for label in order:
            model = _compiled(spec, label, jit_compile)
            first[label].append(_first_fit(model, x, y, spec.batch))
            models[label].append(model)
    first_rows = _summary(first, "Adam")
    for row in first_rows.values():
        row["s"] = row.pop("ms") / 1e3
    step_rows = None
    if rounds:
        if protocol == "batch":
            import keras

            xb, yb = (keras.ops.convert_to_tensor(a[: spec.batch]) for a in (x, y))
            measure = functools.partial(_batch_step, x=xb, y=yb, calls=steps + 1)
        else:
            measure = functools.partial(_fit_step, x=x, y=y, batch=spec.batch)
        measures = {
            label: [functools.partial(measure, m) for m in group]
            for label, group in models.items()
        }
        step_rows = _summary(_rounds(measures, rounds, warmup=1), "Adam")
        del measures
    del models
    keras.backend.clear_session()
    gc.collect()
    return step_rows, first_rows


NO_CALLBACK = "no callback"
NO_CALLBACK_AGAIN = "no callback, again (the protocol's own error)"
MONITOR = "GradientMonitor (alarms' checks on, output off)"
LOGGER_1 = "GradientHistogramLogger(freq=1)"
LOGGER_100 = "GradientHistogramLogger(freq=100), amortized"


def part_g(rounds, steps):
    """(g) the callbacks' cost per batch, on one model, in interleaved rounds.

    One model object runs every configuration (`FAST_MODEL`): the callbacks
    change nothing in its compiled step, except the histogram logger's
    request, which the step is traced again to follow; when the next `fit`
    has no logger, the request is withdrawn (and the step traced again)
    first. Those traces fall in each `fit`'s first batch, which is left
    out. Each round runs one `fit` of `steps` measured steps per
    configuration, in a fresh random order (see `_fit_step`). The logger
    writes on one step in `freq`: its cost at `freq=100` is the median
    (non-writing) step plus 1/100 of what a writing step adds, measured with
    `freq=1` (as in (c)).

    Returns rows with the step's `ms`, what each callback adds to the step
    without it (`added`, round by round, with its 95% interval), and its own
    `on_train_batch_end` time (`own_ms`, and as a share of the step without
    callbacks: `own_share`).
    """
    import keras_clip as kc

    spec = FAST_MODEL
    model = spec.build()
    model.compile(kc.ClippedAdam(1e-3, global_clipnorm=1.0), "mse")
    x, y = _data(spec, steps + 2)
    log_dir = tempfile.mkdtemp(prefix="kc-bench-")
    callbacks = {
        NO_CALLBACK: [],
        NO_CALLBACK_AGAIN: [],
        MONITOR: [kc.GradientMonitor(**QUIET)],
        LOGGER_1: [kc.GradientHistogramLogger(log_dir + "/1", freq=1)],
        LOGGER_100: [kc.GradientHistogramLogger(log_dir + "/100", freq=100)],
    }
    callbacks = {label: [_timed_batch_end(cb) for cb in cbs] for label, cbs in callbacks.items()}

    def measure(label):
        cbs = callbacks[label]
        if not any(isinstance(cb, kc.GradientHistogramLogger) for cb in cbs):
            _withdraw_histograms(model)
        return _fit_step(model, x, y, spec.batch, cbs)

    times = _rounds(
        {label: [functools.partial(measure, label)] for label in callbacks},
        rounds, warmup=1,
    )
    quiet, writing = np.array(times[LOGGER_100]), np.array(times[LOGGER_1])
    times[LOGGER_100] = list(quiet + np.maximum(writing - quiet, 0) / 100)
    base = np.array(times[NO_CALLBACK])
    base_ms = float(np.median(base) * 1e3)
    out = {}
    for label, ts in times.items():
        added = np.array(ts) / base - 1
        lo, hi = _interval(added)
        spent = [t for cb in callbacks[label] for t in cb.batch_end_times]
        own_ms = float(np.median(spent) * 1e3) if spent else None
        out[label] = {
            "ms": float(np.median(ts) * 1e3),
            "added": float(np.median(added)), "added_lo": lo, "added_hi": hi,
            "own_ms": own_ms,
            "own_share": None if own_ms is None else own_ms / base_ms,
        }
    return out


def _withdraw_histograms(model):
    """Stops the step counting histograms for an earlier logger's request."""
    if model.optimizer.record_gradient_histograms(None):
        model.make_train_function(force=True)
