"""GradientMonitor: statistics in logs, epoch aggregates, alarms, per-layer norms."""

import csv
import math
import warnings

import keras
import numpy as np
import pytest

import keras_clip as kc
from keras_clip.callbacks import GradientAlarmError
from keras_clip.callbacks import GradientMonitor
from keras_clip.callbacks.monitor import KINDS
from keras_clip.optimizers import BUILTIN

DEFAULT = ("grad_norm", "grad_norm_max", "clipped_grad_norm", "clip_rate")


def small_model(bias=True):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="tanh", name="hidden", use_bias=bias)(inputs)
    outputs = keras.layers.Dense(1, name="head", use_bias=bias)(x)
    return keras.Model(inputs, outputs)


def data(n=160, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = (x.sum(1, keepdims=True) * scale).astype("float32")
    return x, y


def compiled(opt=None, spe=1, model=None, **kwargs):
    model = model or small_model()
    opt = opt or kc.ClippedAdam(learning_rate=0.01, global_clipnorm=14.0)
    model.compile(optimizer=opt, loss="mse", steps_per_execution=spe, **kwargs)
    return model


def fit(model, x, y, callbacks, epochs=1, batch_size=16, verbose=0):
    return model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
        verbose=verbose, callbacks=callbacks,
    )


def finite_weights(model):
    return all(np.all(np.isfinite(w)) for w in model.get_weights())


class Recorder(keras.callbacks.Callback):
    """After the monitor: each step's statistics (read without a reset) and logs."""

    def __init__(self):
        super().__init__()
        self.steps, self.batch_logs = [], []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        opt = getattr(opt, "inner_optimizer", opt)  # a LossScaleOptimizer's
        stats = opt.gradient_stats()
        stats["layers"] = opt.gradient_norms_by_variable()
        self.steps.append(stats)
        self.batch_logs.append(dict(logs))


# 1. Where the statistics show up.


def test_progress_bar_history_and_csv_logger(capsys, tmp_path):
    path = str(tmp_path / "log.csv")
    model = compiled()
    x, y = data()
    history = fit(
        model, x, y, [GradientMonitor(), keras.callbacks.CSVLogger(path)],
        epochs=2, verbose=1,
    )
    out = capsys.readouterr().out
    assert "grad_norm: " in out and "clip_rate: " in out
    assert "clipped_grad_norm: " in out and "grad_norm_max: " in out
    for key in DEFAULT:
        assert len(history.history[key]) == 2
        assert all(np.isfinite(history.history[key]))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in DEFAULT:
        np.testing.assert_allclose(
            [float(r[key]) for r in rows], history.history[key], rtol=1e-12
        )


def test_epoch_values_aggregate_every_step_not_the_last():
    model = compiled()
    x, y = data()
    fit(model, x, y, [], epochs=1)  # a window left by steps before the monitor
    clipped_before = model.optimizer.gradient_stats()["clipped_steps"]
    recorder = Recorder()
    monitor = GradientMonitor(stats=list(DEFAULT) + ["nonfinite_steps", "clip_threshold"])
    history = fit(model, x, y, [monitor, recorder], epochs=2)
    h = history.history
    for epoch in range(2):
        steps = recorder.steps[10 * epoch : 10 * epoch + 10]
        norms = [s["grad_norm"] for s in steps]
        start = recorder.steps[9]["clipped_steps"] if epoch else clipped_before
        rate = (steps[-1]["clipped_steps"] - start) / 10
        assert 0.0 < rate < 1.0  # the data makes the clip rate informative
        np.testing.assert_allclose(h["grad_norm"][epoch], np.mean(norms), rtol=1e-6)
        assert h["grad_norm"][epoch] != pytest.approx(norms[-1])
        np.testing.assert_allclose(h["grad_norm_max"][epoch], max(norms), rtol=1e-6)
        assert h["clip_rate"][epoch] == pytest.approx(np.mean(np.array(norms) > 14.0))
        assert h["clip_rate"][epoch] == pytest.approx(rate)
        np.testing.assert_allclose(
            h["clipped_grad_norm"][epoch], np.mean([s["clipped_grad_norm"] for s in steps]),
            rtol=1e-6,
        )
        assert h["nonfinite_steps"][epoch] == 0 and h["clip_threshold"][epoch] == 14.0
    # Batch logs hold the epoch so far, like Keras's loss; the last one is the epoch's.
    first, last = recorder.batch_logs[10], recorder.batch_logs[19]
    assert first["grad_norm"] == pytest.approx(recorder.steps[10]["grad_norm"])
    for key in DEFAULT:
        assert last[key] == h[key][1]
    assert "loss_scale" not in h  # no LossScaleOptimizer here


def test_tensorboard_after_the_monitor_writes_the_scalars(tmp_path):
    import tensorflow as tf  # (Keras's TensorBoard callback writes with it)

    model = compiled()
    x, y = data(64)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    fit(model, x, y, [GradientMonitor(), board], epochs=1)
    tags = set()
    for path in tf.io.gfile.glob(str(tmp_path / "train" / "*tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"epoch_grad_norm", "epoch_clip_rate", "epoch_clipped_grad_norm"} <= tags


# 2. Alarms.


def printed_alarms(text):
    """The alarms in printed output: each on a line of its own, no source line."""
    assert "monitor.py" not in text and "_act(" not in text
    assert text.count("GradientMonitor:") == text.count("\nGradientMonitor:")
    return [line for line in text.split("\n") if line.startswith("GradientMonitor:")]


def fit_quietly(model, x, y, callbacks, **kwargs):
    """`fit`, checking that the monitor raises no Python warning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = fit(model, x, y, callbacks, **kwargs)
    assert not [w for w in record if "GradientMonitor" in str(w.message)]
    assert not [w for w in record if "keras_clip" in (w.filename or "")]
    return history


def nan_batch_data(batch=2, batch_size=16, n=160):
    x, y = data(n)
    for b in [batch] if isinstance(batch, int) else batch:
        x[b * batch_size + 3, 1] = np.nan
    return x, y


def test_nan_batch_prints_one_alarm_with_the_step(capsys):
    model = compiled()
    x, y = nan_batch_data(batch=2)
    monitor = GradientMonitor(stats=["grad_norm", "nonfinite_steps"])
    history = fit_quietly(model, x, y, [monitor], epochs=1)
    [message] = printed_alarms(capsys.readouterr().out)
    assert message.startswith(
        "GradientMonitor: non-finite gradient (NaN or Inf) at step 3 (global norm nan)"
    )
    assert "typical norm" in message and "update was skipped" in message
    [event] = monitor.events
    assert (event.step, event.kind) == (3, "nonfinite") and math.isnan(event.value)
    assert history.history["nonfinite_steps"] == [1]
    assert np.isfinite(history.history["grad_norm"][0])  # the mean of finite steps
    assert finite_weights(model)  # the optimizer skipped the step


def test_alarm_prints_on_its_own_line_under_the_progress_bar(capsys):
    model = compiled()
    x, y = nan_batch_data(batch=2)
    fit_quietly(model, x, y, [GradientMonitor()], epochs=1, verbose=1)
    out = capsys.readouterr().out
    assert "━" in out  # the progress bar is there
    [message] = printed_alarms(out)
    assert "━" not in message and "loss:" not in message
    assert "\nGradientMonitor: non-finite gradient (NaN or Inf) at step 3" in out


def test_alarm_goes_to_the_log_without_interactive_logging(capsys, caplog):
    model = compiled()
    x, y = nan_batch_data(batch=2)
    keras.config.disable_interactive_logging()
    try:
        fit_quietly(model, x, y, [GradientMonitor()], epochs=1)
    finally:
        keras.config.enable_interactive_logging()
    assert "GradientMonitor" not in capsys.readouterr().out
    [record] = [r for r in caplog.records if r.name == "keras_clip"]
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith(
        "GradientMonitor: non-finite gradient (NaN or Inf) at step 3"
    )


def test_nan_batch_stop_ends_training_after_that_batch(capsys):
    model = compiled()
    x, y = nan_batch_data(batch=2)
    monitor = GradientMonitor(on_nonfinite="stop")
    history = fit_quietly(model, x, y, [monitor], epochs=3, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3  # batches 0, 1, 2
    assert len(history.history["loss"]) == 1
    assert model.stop_training
    assert finite_weights(model)
    [message] = printed_alarms(capsys.readouterr().out)
    assert "at step 3" in message and message.endswith("Stopping training.")
    assert [(e.step, e.kind) for e in monitor.events] == [(3, "nonfinite")]


def test_nan_batch_raise():
    model = compiled()
    x, y = nan_batch_data(batch=1)
    monitor = GradientMonitor(on_nonfinite="raise")
    with pytest.raises(GradientAlarmError, match="at step 2"):
        fit(model, x, y, [monitor], epochs=1)
    assert [(e.step, e.kind) for e in monitor.events] == [(2, "nonfinite")]


# Stalls.


def overflow_run(policy, callbacks=(), **kwargs):
    """The issue's stall: a finite loss (about 1e22) whose gradient's norm
    overflows float32 on every step; 12 steps per epoch."""
    x = np.random.default_rng(0).standard_normal((192, 6)).astype("float32") * 1e9
    y = np.full((192, 1), 1e11, "float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(optimizer=kc.ClippedAdam(0.01, nonfinite=policy), loss="mse")
    weights = model.get_weights()
    monitor = GradientMonitor(**kwargs)
    history = fit_quietly(model, x, y, [monitor, *callbacks], epochs=2)
    return monitor, history, model, weights


@pytest.mark.parametrize(
    "policy, says",
    [
        ("skip", "were all skipped (non-finite gradients, nonfinite='skip'); "
         "the weights have not changed since the start of training"),
        ("zero", "all had non-finite gradients, applied as zeros (nonfinite='zero'); "
         "no gradient has reached the weights since the start of training"),
    ],
    ids=["skip", "zero"],
)
def test_every_step_overflowing_is_a_stall(capsys, policy, says):
    monitor, history, model, weights = overflow_run(
        policy, [keras.callbacks.TerminateOnNaN()]
    )
    # The loss is finite and frozen, so TerminateOnNaN never fires.
    loss = history.history["loss"]
    assert len(loss) == 2 and all(1e21 < v < 1e23 for v in loss)
    assert model.optimizer.gradient_stats()["nonfinite_steps"] == 24
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    assert monitor.events[0][:2] == (1, "nonfinite")
    assert monitor.events[1] == (10, "stall", 10)
    assert len(monitor.events) == 2
    nonfinite, stall = printed_alarms(capsys.readouterr().out)
    assert "non-finite gradient (NaN or Inf) at step 1 (global norm inf)" in nonfinite
    assert stall == (
        f"GradientMonitor: training has stalled at step 10: the last 10 steps {says}: "
        "nothing is being learned."
    )


def test_stall_with_nonfinite_propagate(capsys):
    monitor, _, _, _ = overflow_run("propagate", stall_steps=4, on_nonfinite=None)
    assert [e[:2] for e in monitor.events] == [(1, "nonfinite"), (4, "stall")]
    [stall] = printed_alarms(capsys.readouterr().out)
    assert stall == (
        "GradientMonitor: training has stalled at step 4: the last 4 steps all had "
        "non-finite gradients, applied as they were (nonfinite='propagate'); every "
        "update since the start of training has applied NaN or Inf: nothing is "
        "being learned."
    )


def test_stall_fires_once_per_run_of_nonfinite_steps(capsys):
    # 12 steps; NaN batches on steps 3-5 and 8-10.
    model = compiled()
    x, y = nan_batch_data(batch=[2, 3, 4, 7, 8, 9], n=192)
    monitor = GradientMonitor(stall_steps=3)
    fit_quietly(model, x, y, [monitor], epochs=1)
    assert monitor.events[1::2] == [(5, "stall", 3), (10, "stall", 3)]
    assert [e[:2] for e in monitor.events[::2]] == [(3, "nonfinite"), (8, "nonfinite")]
    alarms = printed_alarms(capsys.readouterr().out)
    assert alarms[1] == (
        "GradientMonitor: training has stalled at step 5: the last 3 steps were all "
        "skipped (non-finite gradients, nonfinite='skip'); the weights have not "
        "changed since step 2: nothing is being learned."
    )
    assert "at step 10: the last 3 steps" in alarms[3] and "since step 7" in alarms[3]
    assert finite_weights(model)


@pytest.mark.tensorflow(reason="steps_per_execution > 1 (Keras's torch trainer refuses it)")
@pytest.mark.jax
def test_stall_count_with_steps_per_execution():
    # Steps 3-12 of 12 are non-finite. In executions of 4 steps, the first
    # (steps 1-4) ends a run the monitor counts from 1 (it cannot tell that
    # step 3 was non-finite too), so it counts 5 at step 8, not 6.
    events = {}
    for spe in (1, 4):
        model = compiled(spe=spe)
        x, y = nan_batch_data(batch=range(2, 12), n=192)
        monitor = GradientMonitor(stall_steps=6, on_nonfinite=None, on_stall=None)
        fit(model, x, y, [monitor], epochs=1)
        events[spe] = [e for e in monitor.events if e.kind == "stall"]
    assert events[1] == [(8, "stall", 6)]
    assert events[4] == [(12, "stall", 9)]


# Explode and vanish.


def alarm_run(capsys, spike=False, vanish=False, **kwargs):
    """24 steps of 8 samples: steady, or a 1000x spike at step 16, or zero
    gradients from step 13 on."""
    x, y = data(192)
    if spike:
        y[15 * 8 : 16 * 8] *= 1000.0
    if vanish:  # no bias: zero inputs give exactly zero gradients
        x[12 * 8 :] = 0.0
        y[12 * 8 :] = 0.0
    keras.utils.set_random_seed(0)  # the same weights in every run of a test
    model = compiled(
        kc.ClippedSGD(learning_rate=0.01, global_clipnorm=1.0),
        model=small_model(bias=not vanish),
    )
    monitor = GradientMonitor(**kwargs)
    fit_quietly(model, x, y, [monitor], epochs=1, batch_size=8)
    return monitor, printed_alarms(capsys.readouterr().out), model


def test_steady_run_triggers_no_alarm(capsys):
    monitor, alarms, _ = alarm_run(capsys)
    assert monitor.events == [] and alarms == []


def test_spike_triggers_exactly_the_explode_alarm(capsys):
    monitor, alarms, model = alarm_run(capsys, spike=True, patience=3)
    [event] = monitor.events
    assert (event.step, event.kind) == (16, "explode")
    assert event.value > 100.0
    [message] = alarms
    assert f"exploding gradient at step 16: global norm {event.value:.4g} is" in message
    ratio, limit = (float(part.split("x")[0]) for part in message.split(" is ")[1:])
    assert f"{ratio:.3g}x the typical norm " in message and ratio > 100.0
    assert 10.0 <= limit < 20.0  # explode_factor, or a little more: norms vary
    assert message.endswith(
        "x (explode_factor=10, or 6 spreads where the recent norms are noisy)."
    )
    assert finite_weights(model)


def test_explode_factor_and_warmup_steps(capsys):
    monitor, [message], _ = alarm_run(capsys, spike=True)
    ratio = float(message.split(" is ")[1].split("x")[0])
    assert ratio > 100.0
    for kwargs, fires in [
        (dict(explode_factor=ratio * 0.9), True),
        (dict(explode_factor=ratio * 1.1), False),
        (dict(warmup_steps=15), True),  # 15 finite steps came before the spike
        (dict(warmup_steps=16), False),
    ]:
        monitor, _, _ = alarm_run(capsys, spike=True, **kwargs)
        assert [(e.step, e.kind) for e in monitor.events] == (
            [(16, "explode")] if fires else []
        ), kwargs


def test_vanishing_triggers_exactly_the_vanish_alarm(capsys):
    monitor, alarms, _ = alarm_run(capsys, vanish=True, patience=5)
    assert [(e.step, e.kind, e.value) for e in monitor.events] == [(17, "vanish", 0.0)]
    [message] = alarms
    assert "vanishing gradient at step 17: global norm 0 has been below" in message
    assert "vanish_threshold=1e-07 for 5 consecutive steps (patience=5)" in message


def test_an_alarm_with_action_none_is_recorded_silently(capsys):
    monitor, alarms, _ = alarm_run(capsys, spike=True, on_explode=None)
    assert [(e.step, e.kind) for e in monitor.events] == [(16, "explode")]
    assert alarms == []


def test_explode_raise(capsys):
    with pytest.raises(GradientAlarmError, match="exploding gradient at step 16"):
        alarm_run(capsys, spike=True, on_explode="raise")


# A norm that drifts: a bidirectional LSTM whose gradient norm grows about
# sevenfold while it learns.


def sequence_task(n=512, length=40, seed=0):
    """Is the sum of a sequence's first feature positive? 10% of labels flipped."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, length, 3)).astype("float32")
    y = x[:, :, 0].sum(1) > 0
    y = np.where(rng.random(n) < 0.1, ~y, y)[:, None].astype("float32")
    return x, y


@pytest.fixture(scope="module")
def bilstm():
    """5 epochs of 32 steps with a `GradientMonitor`; the model trains on in
    `test_bilstm_spike_raises_the_explode_alarm`."""
    keras.utils.set_random_seed(0)
    x, y = sequence_task()
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Bidirectional(keras.layers.LSTM(8))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(
        optimizer=kc.ClippedAdam(learning_rate=3e-3),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    monitor, recorder = GradientMonitor(), Recorder()
    # Sample weights of 1 here, so the spiked epoch runs the same traced step.
    history = model.fit(
        x, y, sample_weight=np.ones(len(x), "float32"), batch_size=16, epochs=5,
        shuffle=False, verbose=0, callbacks=[monitor, recorder],
    )
    norms = np.array([s["grad_norm"] for s in recorder.steps])
    return model, monitor, list(monitor.events), history.history, norms


@pytest.mark.slow
def test_bilstm_whose_norm_drifts_while_it_learns_raises_no_alarm(bilstm):
    _, _, events, h, norms = bilstm
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.2  # it learns
    assert h["grad_norm"][-1] > 4.0 * h["grad_norm"][0]  # and its norm drifts
    # The rule this replaced, max norm > 10x the median of the last 100
    # batches' means (after 10 steps), raised alarms on this run.
    old = [
        step for step in range(11, len(norms) + 1)
        if norms[step - 1] > 10.0 * np.median(norms[max(0, step - 101) : step - 1])
    ]
    assert len(old) >= 2
    assert events == []


@pytest.mark.slow
def test_bilstm_spike_raises_the_explode_alarm(bilstm, capsys):
    # One batch of the sixth epoch weighs 100x: its gradient is 100x what it
    # would be. (Scaling a batch's inputs by 100 does not make a spike here:
    # the LSTM's gates saturate.)
    model, monitor, _, _, _ = bilstm
    x, y = sequence_task()
    weights = np.ones(len(x), "float32")
    weights[20 * 16 : 21 * 16] = 100.0
    recorder = Recorder()
    model.fit(
        x, y, sample_weight=weights, batch_size=16, epochs=1, shuffle=False,
        verbose=0, callbacks=[monitor, recorder],
    )
    step = 5 * 32 + 21
    assert monitor.events == [(step, "explode", recorder.steps[20]["grad_norm"])]
    [message] = printed_alarms(capsys.readouterr().out)
    ratio, limit = (float(part.split("x")[0]) for part in message.split(" is ")[1:])
    assert message.startswith(f"GradientMonitor: exploding gradient at step {step}")
    assert ratio > 30.0 and limit > 10.0  # the recent norms' spread set the limit


# steps_per_execution.


@pytest.mark.tensorflow(reason="steps_per_execution > 1 (Keras's torch trainer refuses it)")
@pytest.mark.jax
def test_steps_per_execution_counts_every_step():
    # 10 batches per epoch: executions of 4, 4 and 2 steps; a NaN batch inside
    # the first execution of each epoch, not at its end.
    runs = {}
    for spe in (1, 4):
        keras.utils.set_random_seed(0)
        model = compiled(spe=spe)
        x, y = nan_batch_data(batch=1)
        monitor = GradientMonitor(
            stats=list(DEFAULT) + ["nonfinite_steps"], on_nonfinite=None
        )
        history = fit(model, x, y, [monitor], epochs=2)
        runs[spe] = history.history, monitor.events, model.optimizer.gradient_stats()
    (h1, e1, s1), (h4, e4, s4) = runs[1], runs[4]
    assert s1["steps"] == s4["steps"] == 20
    assert h1["nonfinite_steps"] == h4["nonfinite_steps"] == [1, 1]
    assert h1["clip_rate"] == h4["clip_rate"]
    assert 0.0 < h1["clip_rate"][0] < 0.9
    for key in ("grad_norm", "grad_norm_max"):
        np.testing.assert_allclose(h4[key], h1[key], rtol=1e-6)
    assert [(e.step, e.kind) for e in e1] == [(2, "nonfinite"), (12, "nonfinite")]
    assert [(e.step, e.kind) for e in e4] == [(4, "nonfinite"), (14, "nonfinite")]


# 3. Per-layer norms.


def rnn_model():
    inputs = keras.Input((5, 3))
    x = keras.layers.SimpleRNN(4, name="rnn")(inputs)
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs)


def test_per_layer_norms_in_history_not_in_the_progress_bar(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 5, 3)).astype("float32")
    y = x.sum((1, 2))[:, None].astype("float32")
    model = compiled(kc.ClippedAdam(0.01, clipper="zclip"), model=rnn_model())
    recorder = Recorder()
    path = str(tmp_path / "log.csv")
    history = fit(
        model, x, y,
        [GradientMonitor(per_layer=True), recorder, keras.callbacks.CSVLogger(path)],
        epochs=2, batch_size=32, verbose=1,
    )
    h = history.history
    assert len(h["grad_norm/rnn"]) == len(h["grad_norm/head"]) == 2
    # One step per epoch: the layers' norms make up the global norm.
    for epoch in range(2):
        total = math.hypot(h["grad_norm/rnn"][epoch], h["grad_norm/head"][epoch])
        np.testing.assert_allclose(total, h["grad_norm"][epoch], rtol=1e-5)
        layers = recorder.steps[epoch]["layers"]
        rnn = math.sqrt(sum(v * v for k, v in layers.items() if k.startswith("rnn/")))
        np.testing.assert_allclose(h["grad_norm/rnn"][epoch], rnn, rtol=1e-6)
    assert "grad_norm/" not in capsys.readouterr().out
    assert all("grad_norm/" not in k for logs in recorder.batch_logs for k in logs)
    with open(path) as f:
        assert "grad_norm/" not in f.readline()


# 4. Reads only.


class CountingData(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.fetched = x, y, 0

    def __len__(self):
        return len(self.x) // 16

    def __getitem__(self, i):
        self.fetched += 1
        return self.x[16 * i : 16 * i + 16], self.y[16 * i : 16 * i + 16]


def test_the_monitor_changes_nothing_and_reads_the_data_once():
    x, y = data(64)
    results = []
    for callbacks in ([], [GradientMonitor(per_layer=True)]):
        keras.utils.set_random_seed(0)
        model = compiled()
        dataset = CountingData(x, y)
        model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks, shuffle=False)
        results.append((model.get_weights(), dataset.fetched))
    (w0, n0), (w1, n1) = results
    assert n0 == n1
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)


# Reading: one host read of the step's readout a batch.


class BothReads(keras.callbacks.Callback):
    """Each batch: the readout's statistics since the last read, then the
    resetting reader's (the window path), of the same updates."""

    def on_train_begin(self, logs=None):
        self.opt = self.model.optimizer
        self.last = {"steps": 0, "iterations": 0}  # (a fresh optimizer)
        self.pairs = []

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 (JAX: the step's state back into the variables)
        fast = self.opt._stats_since(self.last)
        slow = self.opt.gradient_stats(reset_window=True)
        self.pairs.append((fast, slow))
        self.last = slow


MANY_STEPS = [  # steps_per_execution > 1 (Keras's torch trainer refuses it)
    pytest.mark.tensorflow(reason="steps_per_execution > 1"),
    pytest.mark.jax(reason="steps_per_execution > 1"),
]


@pytest.mark.parametrize("spe", [1, pytest.param(5, marks=MANY_STEPS)])
def test_the_readout_holds_what_the_resetting_reader_reads(spe):
    keras.utils.set_random_seed(0)
    model = compiled(spe=spe)
    assert model.optimizer._keep_readout()  # (what the monitor asks for)
    x, y = nan_batch_data(batch=[2, 6])
    both = BothReads()
    fit(model, x, y, [both], epochs=2)
    assert len(both.pairs) == 20 // spe
    windows = 0
    for (fast, complete), slow in both.pairs:
        assert complete
        assert fast.keys() == slow.keys()
        for key in fast:
            if key != "window_norm_sum":
                np.testing.assert_equal(fast[key], slow[key], err_msg=key)
        # Both add the same `spe` norms (>= 0), the step in float32 and the
        # host in float64: each addition after the first rounds by at most
        # half an ulp of the total.
        half_ulps = (np.finfo(np.float32).eps + np.finfo(np.float64).eps) / 2
        bound = (spe - 1) * half_ulps * slow["window_norm_sum"]
        assert abs(fast["window_norm_sum"] - slow["window_norm_sum"]) <= bound
        windows += fast["window_steps"]
    assert windows == 16 and both.pairs[-1][1]["nonfinite_steps"] == 4  # 2 an epoch


def counted_reads(monkeypatch, opt):
    counts = {"readout": 0, "resetting": 0}
    since, stats = type(opt)._stats_since, type(opt).gradient_stats

    def counting_since(self, last):
        counts["readout"] += 1
        return since(self, last)

    def counting_stats(self, reset_window=False):
        counts["resetting"] += reset_window
        return stats(self, reset_window)

    monkeypatch.setattr(type(opt), "_stats_since", counting_since)
    monkeypatch.setattr(type(opt), "gradient_stats", counting_stats)
    return counts


def monitored_run(monkeypatch, spe, accumulation=None):
    keras.utils.set_random_seed(0)
    opt = kc.ClippedAdam(0.01, global_clipnorm=14.0, gradient_accumulation_steps=accumulation)
    model = compiled(opt, spe=spe)
    opt.build(model.trainable_variables)  # (as Keras-JAX does before `fit`)
    x, y = nan_batch_data(batch=3)
    counts = counted_reads(monkeypatch, opt)
    recorder = Recorder()  # (reads without a reset)
    monitor = GradientMonitor(stats=list(DEFAULT) + ["nonfinite_steps"], on_nonfinite=None)
    history = fit(model, x, y, [monitor, recorder], epochs=2)
    return history.history, recorder, counts


@pytest.mark.parametrize("accumulation", [None, 2])
def test_each_batch_reads_the_readout_once_and_counts_every_update(monkeypatch, accumulation):
    h, recorder, counts = monitored_run(monkeypatch, 1, accumulation)
    # A reset at the start, then one read of the readout a batch.
    assert counts == {"readout": 20, "resetting": 1}
    updates = 10 // (accumulation or 1)
    for epoch in range(2):
        steps = recorder.steps[10 * epoch : 10 * epoch + 10]
        start = recorder.steps[10 * epoch - 1]["steps"] if epoch else 0
        norms = np.array(list({s["steps"]: s["grad_norm"] for s in steps if s["steps"] > start}.values()))
        finite = norms[np.isfinite(norms)]
        assert finite.size == updates - 1 and h["nonfinite_steps"][epoch] == 1
        np.testing.assert_allclose(h["grad_norm"][epoch], finite.mean(), rtol=1e-6)
        assert h["grad_norm_max"][epoch] == finite.max()


@pytest.mark.parametrize(
    "spe, readouts, resets",
    [
        # one execution an epoch, all in the readout
        pytest.param(kc.stats.RING, 2, 1, marks=MANY_STEPS),
        # more steps than the readout keeps: windows
        pytest.param(kc.stats.RING + 1, 0, 3, marks=MANY_STEPS),
    ],
)
def test_steps_per_execution_read_from_the_readout_or_the_windows(
    monkeypatch, spe, readouts, resets
):
    one, _, _ = monitored_run(monkeypatch, 1)
    h, _, counts = monitored_run(monkeypatch, spe)
    assert counts == {"readout": readouts, "resetting": resets}
    assert h["nonfinite_steps"] == one["nonfinite_steps"] == [1, 1]
    assert h["clip_rate"] == one["clip_rate"]
    for key in ("grad_norm", "grad_norm_max"):
        # The step's float32 window adds at most 9 norms an epoch (5e-7).
        np.testing.assert_allclose(h[key], one[key], rtol=1e-6, err_msg=key)


def test_the_readout_only_on_request_and_never_saved(tmp_path):
    model = compiled()
    opt = model.optimizer
    x, y = data(32)
    fit(model, x, y, [])
    assert opt._readout is None  # without a monitor the step writes none
    fit(model, x, y, [GradientMonitor()])
    readout = opt._readout
    assert readout is not None and np.any(keras.ops.convert_to_numpy(readout.value))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path).optimizer
    assert loaded._readout is None and len(loaded.variables) == len(opt.variables) - 1
    np.testing.assert_equal(loaded.gradient_stats(), opt.gradient_stats())
    fit(model, x, y, [GradientMonitor()])
    model.load_weights(path)  # earlier statistics: the readout no longer holds them
    assert not np.any(keras.ops.convert_to_numpy(readout.value))
    assert opt._stats_since(opt.gradient_stats()) is None


def test_more_updates_in_a_batch_than_the_readout_keeps_warn_once():
    # A train step may apply the optimizer more than once: the ring then holds
    # the last RING updates of that batch, and the monitor says so and reads
    # windows (every update) from the next batch on.
    model = compiled()
    x, y = data(32)
    monitor = GradientMonitor(stats=["grad_norm", "grad_norm_max"])
    fit(model, x, y, [monitor])
    opt, variables = model.optimizer, model.trainable_variables

    def apply(times, scale):
        for i in range(times):
            opt.apply([keras.ops.full(v.shape, scale * (i + 1)) for v in variables], variables)

    ring = kc.stats.RING
    monitor.on_epoch_begin(1)  # an epoch of the updates below only
    apply(ring + 3, 1e-3)  # the largest norm last
    with pytest.warns(UserWarning, match=f"{ring + 3} updates in one batch, more than the {ring}"):
        monitor.on_train_batch_end(2, logs := {})
    size = sum(int(np.prod(v.shape)) for v in variables)
    assert logs["grad_norm_max"] == pytest.approx(1e-3 * (ring + 3) * size**0.5, rel=1e-6)
    assert opt.gradient_stats()["window_steps"] == 0  # the window starts afresh
    apply(2, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_train_batch_end(3, logs := {})
    assert not [w for w in caught if "GradientMonitor" in str(w.message)]
    assert logs["grad_norm_max"] == pytest.approx(2 * size**0.5, rel=1e-6)


# Optimizers: every Clipped* class, the loss-scale wrapper, plain Keras.

CLIPPERS = [None, "value", "norm", "global_norm", "agc", "autoclip", "zclip", "adagc"]


@pytest.mark.parametrize(
    "name, clipper",
    [(n, CLIPPERS[i % len(CLIPPERS)]) for i, n in enumerate(sorted(BUILTIN))],
)
def test_every_clipped_optimizer(name, clipper):
    model = compiled(BUILTIN[name](learning_rate=1e-3, clipper=clipper))
    x, y = data(48)
    recorder = Recorder()
    history = fit(model, x, y, [GradientMonitor(), recorder], epochs=1)
    h = history.history
    norms = [s["grad_norm"] for s in recorder.steps]
    np.testing.assert_allclose(h["grad_norm"], [np.mean(norms)], rtol=1e-6)
    assert h["clip_rate"] == [recorder.steps[-1]["clipped_steps"] / 3]
    assert np.isfinite(h["clipped_grad_norm"][0])


def test_loss_scale_optimizer_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = compiled(kc.ClippedAdam(0.01, global_clipnorm=14.0))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    monitor = GradientMonitor(stats=["grad_norm", "clip_rate", "loss_scale"])
    history = fit(model, x, y, [monitor], epochs=2)
    scale = history.history["loss_scale"]
    assert scale[-1] == float(model.optimizer.dynamic_scale.numpy())
    assert all(s <= 2.0**15 and math.log2(s).is_integer() for s in scale)
    assert all(np.isfinite(history.history["grad_norm"]))
    # Overflowing float16 steps are the loss scaler's business: no alarm.
    assert monitor.events == []


def test_explicit_loss_scale_optimizer_is_unwrapped():
    inner = kc.ClippedSGD(0.01, global_clipnorm=1.0)
    opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=64.0)
    model = compiled(opt)
    x, y = data(64)
    recorder = Recorder()
    history = fit(model, x, y, [GradientMonitor(stats=["grad_norm", "loss_scale"]), recorder])
    assert history.history["loss_scale"] == [64.0]
    norms = [s["grad_norm"] for s in recorder.steps]
    np.testing.assert_allclose(history.history["grad_norm"], [np.mean(norms)], rtol=1e-6)


class MySGD(keras.optimizers.SGD):
    pass


@pytest.mark.parametrize(
    "opt, advice",
    [
        (lambda: keras.optimizers.Adam(0.01),
         "Compile the model with `keras_clip.ClippedAdam(...)`"),
        (lambda: MySGD(0.01), "Compile the model with `keras_clip.clipped(MySGD)(...)`"),
        (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
         "Compile the model with `keras_clip.ClippedSGD(...)`"),
    ],
    ids=["Adam", "custom", "LossScaleOptimizer"],
)
def test_plain_keras_optimizer_is_a_clear_error(opt, advice):
    model = compiled(opt())
    x, y = data(32)
    with pytest.raises(TypeError) as info:
        fit(model, x, y, [GradientMonitor()])
    message = str(info.value)
    assert "GradientMonitor reads the gradient statistics that keras-clip" in message
    assert advice in message
    assert "Received: optimizer=<" in message


@pytest.mark.skipif(
    not hasattr(keras.optimizers, "MultiOptimizer"), reason="MultiOptimizer came with Keras 3.15"
)
def test_multi_optimizer_is_a_clear_error():
    model = small_model()
    opt = keras.optimizers.MultiOptimizer(lambda variable: kc.ClippedSGD())
    model.compile(optimizer=opt, loss="mse")
    monitor = GradientMonitor()
    monitor.set_model(model)
    with pytest.raises(TypeError, match="does not support `MultiOptimizer`.*Received: optimizer="):
        monitor.on_train_begin()


# Arguments.


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        (dict(stats="grad_norm"), TypeError,
         "`stats` must be a list of strings. Received: stats='grad_norm'"),
        (dict(stats=["grad_norm", 1]), TypeError, "Received: stats=['grad_norm', 1]"),
        (dict(stats=["grad_norm", "loss"]), ValueError,
         "Unknown name 'loss' in `stats`; the names are \"grad_norm\", \"grad_norm_max\", "
         "\"clipped_grad_norm\", \"clip_rate\", \"nonfinite_steps\", \"clip_threshold\", "
         "\"loss_scale\". Received: stats=['grad_norm', 'loss']"),
        (dict(stats=("clip_rate", "clip_rate")), ValueError,
         "`stats` names a statistic twice. Received: stats=('clip_rate', 'clip_rate')"),
        (dict(per_layer=1), TypeError, "`per_layer` must be a bool. Received: per_layer=1"),
        (dict(explode_factor=1.0), ValueError,
         "`explode_factor` must be in (1.0, inf]. Received: explode_factor=1.0"),
        (dict(explode_factor="10"), TypeError,
         "`explode_factor` must be a number. Received: explode_factor='10'"),
        (dict(explode_factor=float("inf")), ValueError,
         "`explode_factor` must be finite. Received: explode_factor=inf"),
        (dict(warmup_steps=-1), ValueError,
         "`warmup_steps` must be in [0, inf]. Received: warmup_steps=-1"),
        (dict(warmup_steps=2.0), TypeError,
         "`warmup_steps` must be an integer. Received: warmup_steps=2.0"),
        (dict(vanish_threshold=0), ValueError,
         "`vanish_threshold` must be in (0.0, inf]. Received: vanish_threshold=0"),
        (dict(vanish_threshold=None), TypeError, "Received: vanish_threshold=None"),
        (dict(patience=0), ValueError, "`patience` must be in [1, inf]. Received: patience=0"),
        (dict(patience=True), TypeError, "Received: patience=True"),
        (dict(filter_nonfinite_loss=1), TypeError,
         "`filter_nonfinite_loss` must be a bool. Received: filter_nonfinite_loss=1"),
        (dict(stall_steps=0), ValueError,
         "`stall_steps` must be in [1, inf]. Received: stall_steps=0"),
        (dict(stall_steps=2.5), TypeError,
         "`stall_steps` must be an integer. Received: stall_steps=2.5"),
        (dict(on_stall="stall"), ValueError,
         '`on_stall` must be one of "warn", "stop", "raise" or None. '
         "Received: on_stall='stall'"),
        (dict(on_stall=0), TypeError, "Received: on_stall=0"),
        (dict(on_nonfinite="ignore"), ValueError,
         '`on_nonfinite` must be one of "warn", "stop", "raise" or None. '
         "Received: on_nonfinite='ignore'"),
        (dict(on_explode=False), TypeError, "Received: on_explode=False"),
        (dict(on_vanish="Warn"), ValueError, "Received: on_vanish='Warn'"),
    ],
)
def test_bad_arguments(kwargs, err, msg):
    with pytest.raises(err) as info:
        GradientMonitor(**kwargs)
    assert str(info.value).endswith(msg)


def test_config_round_trip():
    monitor = GradientMonitor(
        stats=["grad_norm", "loss_scale"], per_layer=True, explode_factor=5,
        warmup_steps=3, vanish_threshold=1e-5, patience=4, stall_steps=7,
        on_nonfinite="stop", on_stall="raise", on_explode="raise", on_vanish=None,
        filter_nonfinite_loss=False,
    )
    config = monitor.get_config()
    assert config["stall_steps"] == 7 and config["on_stall"] == "raise"
    assert config["filter_nonfinite_loss"] is False
    assert GradientMonitor.from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(monitor)
    assert serialized["registered_name"] == "keras_clip>GradientMonitor"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    default = GradientMonitor.from_config(GradientMonitor().get_config())
    assert default.stats == DEFAULT
    assert (default.stall_steps, default.on_stall) == (10, "warn")


def test_exported():
    assert kc.GradientMonitor is GradientMonitor
    assert "GradientMonitor" in kc.__all__
    assert KINDS == ("nonfinite", "stall", "explode", "vanish")
