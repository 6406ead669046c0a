"""Clipped* optimizers: training, saving, the non-finite policies, statistics."""

import os
import warnings

import keras
import numpy as np
import pytest
import steps

import keras_clip as kc
from keras_clip import stats
from keras_clip.optimizers import BUILTIN
from keras_clip.optimizers import builtin_optimizer_classes

CLASSES = sorted(BUILTIN)
BACKEND = keras.backend.backend()
# TensorFlow (`tf.function(jit_compile=True)`) and JAX (`jax.jit`) compile the
# step with XLA; torch's `fit` runs it eagerly (its `jit_compile=True` is
# `torch.compile`, not tested here).
XLA = BACKEND != "torch"
JIT = [
    pytest.param(True, marks=[
        pytest.mark.tensorflow(reason="XLA: tf.function(jit_compile=True) or jax.jit"),
        pytest.mark.jax,
    ]),
    False,
]


def Step(opt, variables, jit=XLA):
    """`opt.apply(grads, variables)` on NumPy gradients, run as training runs
    it (tests/steps.py): with XLA (`jit=True`) or on the backend's other path
    (TensorFlow: a graph; JAX and torch: eagerly). `traces` counts the runs
    of the step's Python."""
    mode = steps.XLA if jit else ("graph" if BACKEND == "tensorflow" else "eager")
    return steps.Step(opt, variables, mode)


def small_model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = np.stack([x.sum(1), x[:, 0] * 3], axis=1).astype("float32") * 5
    return x, y


def test_every_keras_optimizer_has_a_clipped_class():
    for name, cls in builtin_optimizer_classes().items():
        clipped_cls = getattr(kc, f"Clipped{name}")
        assert issubclass(clipped_cls, cls) and issubclass(clipped_cls, kc.ClippingMixin)
        assert f"Clipped{name}" in kc.__all__
        assert keras.saving.get_registered_name(clipped_cls) == f"keras_clip>Clipped{name}"


@pytest.mark.parametrize("jit", JIT, ids=["jit", "nojit"])
@pytest.mark.parametrize("name", CLASSES)
def test_fit(name, jit):
    model = small_model()
    opt = BUILTIN[name](learning_rate=0.01, global_clipnorm=1.0)
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    before = [w.copy() for w in model.get_weights()]
    x, y = data()
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    after = model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    stats = opt.gradient_stats()
    assert stats["steps"] == 8 and stats["clip_threshold"] == 1.0
    assert stats["clipped_steps"] == 8  # targets of scale 5: always clipped
    np.testing.assert_allclose(stats["clipped_grad_norm"], 1.0, rtol=1e-5)


def _opt_values(opt):
    return [np.asarray(v.numpy()) for v in opt.variables]


@pytest.mark.parametrize("name", CLASSES)
def test_keras_file_round_trip(name, tmp_path):
    model = small_model()
    opt = BUILTIN[name](learning_rate=0.01, clipper=kc.NormClip(0.5))
    model.compile(optimizer=opt, loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is type(opt)
    assert loaded.optimizer.get_config() == opt.get_config()
    a, b = _opt_values(opt), _opt_values(loaded.optimizer)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert loaded.optimizer.gradient_stats() == opt.gradient_stats()


@pytest.mark.tensorflow(reason="tf.train.Checkpoint")
def test_tf_checkpoint_restores_everything(tmp_path):
    import tensorflow as tf

    model = small_model()
    opt = kc.ClippedAdam(learning_rate=0.01, clipper=kc.GlobalNormClip(0.7))
    model.compile(optimizer=opt, loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).save(
        os.path.join(tmp_path, "ckpt")
    )
    model2 = small_model()
    opt2 = kc.ClippedAdam(learning_rate=0.01, clipper=kc.GlobalNormClip(0.7))
    opt2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(prefix).assert_consumed()
    for u, v in zip(_opt_values(opt), _opt_values(opt2)):
        np.testing.assert_array_equal(u, v)
    assert opt2.gradient_stats() == opt.gradient_stats()
    assert float(opt2.clipper._state_variables["threshold"].numpy()) == np.float32(0.7)


def test_shortcuts_map_to_clippers():
    assert isinstance(kc.ClippedAdam(clipnorm=1.0).clipper, kc.NormClip)
    assert isinstance(kc.ClippedAdam(clipvalue=1.0).clipper, kc.ValueClip)
    opt = kc.ClippedAdam(global_clipnorm=2.0)
    assert isinstance(opt.clipper, kc.GlobalNormClip) and opt.clipper.max_norm == 2.0
    assert isinstance(kc.ClippedSGD(clipper="agc").clipper, kc.AdaptiveGradClip)
    assert kc.ClippedSGD().clipper is None
    config = opt.get_config()
    assert config["global_clipnorm"] == 2.0 and config["nonfinite"] == "skip"
    again = kc.ClippedAdam.from_config(config)
    assert again.get_config() == config


SHORTCUTS = [
    ("clipnorm", kc.NormClip, "max_norm"),
    ("clipvalue", kc.ValueClip, "max_value"),
    ("global_clipnorm", kc.GlobalNormClip, "max_norm"),
]


@pytest.mark.parametrize("name, cls, attr", SHORTCUTS, ids=[s[0] for s in SHORTCUTS])
def test_keras_clipping_attributes_tell_the_truth(name, cls, attr):
    # Code written for Keras reads `opt.clipnorm` etc. to see how an
    # optimizer clips: they must not read None while a clipper clips.
    others = [n for n, _, _ in SHORTCUTS if n != name]
    for opt in (kc.ClippedAdam(**{name: 0.5}), kc.ClippedAdam(clipper=cls(0.5))):
        assert getattr(opt, name) == 0.5
        assert [getattr(opt, n) for n in others] == [None, None]
        config = opt.get_config()
        assert config[name] == 0.5 and config["clipper"] is None
        assert [config[n] for n in others] == [None, None]
        again = kc.ClippedAdam.from_config(config)
        assert type(again.clipper) is cls and getattr(again.clipper, attr) == 0.5
        assert again.get_config() == config
    # Setting the attribute sets the clipper's threshold.
    opt = kc.ClippedAdam(**{name: 0.5})
    setattr(opt, name, 0.25)
    assert getattr(opt.clipper, attr) == 0.25 and opt.get_config()[name] == 0.25
    with pytest.raises(ValueError, match=f"Received: {others[0]}=1.0"):
        setattr(opt, others[0], 1.0)


def test_other_clippers_leave_keras_attributes_none():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    for clipper in (kc.ZClip(), kc.AdaptiveGradClip(), kc.GlobalNormClip(schedule), None):
        opt = kc.ClippedAdam(clipper=clipper)
        config = opt.get_config()
        assert [config[n] for n, _, _ in SHORTCUTS] == [None] * 3
        assert kc.ClippedAdam.from_config(config).get_config() == config
        if clipper is None or type(clipper) is not kc.GlobalNormClip:
            assert [getattr(opt, n) for n, _, _ in SHORTCUTS] == [None] * 3
    # A scheduled threshold is the truth too; it is saved with its clipper.
    assert kc.ClippedAdam(global_clipnorm=schedule).global_clipnorm is schedule


def test_statistics_reach_through_loss_scale_optimizer():
    # Keras wraps the optimizer of every mixed_float16 model.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_model()
        model.compile(optimizer=kc.ClippedAdam(0.01, global_clipnorm=1.0), loss="mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.fit(*data(), epochs=2, batch_size=16, verbose=0)
    opt = model.optimizer
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert opt.gradient_stats() == opt.inner_optimizer.gradient_stats()
    assert opt.gradient_stats()["steps"] == int(opt.inner_optimizer.iterations.numpy())
    assert opt.gradient_norms_by_variable() == opt.inner_optimizer.gradient_norms_by_variable()
    plain = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    with pytest.raises(AttributeError, match="needs a keras-clip optimizer"):
        plain.gradient_stats()


def test_clipped_factory():
    assert kc.clipped(keras.optimizers.Adam) is kc.ClippedAdam
    assert kc.clipped(kc.ClippedAdam) is kc.ClippedAdam

    class MySGD(keras.optimizers.SGD):
        pass

    cls = kc.clipped(MySGD)
    assert cls is kc.clipped(MySGD) and cls.__name__ == "ClippedMySGD"
    assert keras.saving.get_registered_name(cls) == "keras_clip>ClippedMySGD"
    with pytest.raises(TypeError, match="Received: cls=3"):
        kc.clipped(3)
    with pytest.raises(TypeError, match="wraps other optimizers"):
        kc.clipped(keras.optimizers.LossScaleOptimizer)


def test_factory_class_reloads(tmp_path):
    @keras.saving.register_keras_serializable(package="my_pkg")
    class MyAdam(keras.optimizers.Adam):
        pass

    cls = kc.clipped(MyAdam)
    assert keras.saving.get_registered_name(cls) == "keras_clip>Clippedmy_pkg.MyAdam"
    model = small_model()
    model.compile(optimizer=cls(global_clipnorm=1.0), loss="mse")
    model.fit(*data(), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    assert type(keras.saving.load_model(path).optimizer) is cls


# Thresholds live in variables.


def _grads_and_vars():
    variables = [keras.Variable(np.ones((3, 2), "float32")), keras.Variable(np.ones(2, "float32"))]
    grads = [np.full((3, 2), 2.0, "float32"), np.array([3.0, 4.0], "float32")]
    return grads, variables


def test_new_threshold_takes_effect_without_retracing():
    grads, variables = _grads_and_vars()
    opt = kc.ClippedSGD(learning_rate=0.1, clipper=kc.GlobalNormClip(1.0))
    step = Step(opt, variables)
    step(grads)
    assert opt.gradient_stats()["clipped_grad_norm"] == pytest.approx(1.0)
    traces = step.traces
    opt.clipper.max_norm = 0.25
    step(grads)
    stats = opt.gradient_stats()
    assert stats["clipped_grad_norm"] == pytest.approx(0.25)
    assert stats["clip_threshold"] == 0.25
    if XLA:  # (torch runs the step's Python every time)
        assert step.traces == traces
    assert opt.global_clipnorm == 0.25 and opt.get_config()["global_clipnorm"] == 0.25


def test_schedule_threshold_follows_iterations():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [2.0, 0.5])
    grads, variables = _grads_and_vars()
    opt = kc.ClippedSGD(learning_rate=0.1, clipper=kc.GlobalNormClip(schedule))
    step = Step(opt, variables, jit=False)
    seen = []
    for _ in range(4):
        step(grads)
        seen.append(opt.gradient_stats()["clip_threshold"])
    assert seen == [2.0, 2.0, 2.0, 0.5]  # evaluated on iterations 0..3
    with pytest.raises(ValueError, match="between a number and a schedule"):
        opt.clipper.max_norm = 1.0


# Non-finite gradients.


def _adam_case(policy, bad):
    """Two steps of ClippedAdam; the second one's gradient holds `bad`."""
    variables = [keras.Variable(np.ones((4, 3), "float32"), name="w"),
                 keras.Variable(np.ones(3, "float32"), name="b")]
    rng = np.random.default_rng(0)
    good = [rng.standard_normal((4, 3)).astype("float32"),
            rng.standard_normal(3).astype("float32")]
    opt = kc.ClippedAdam(learning_rate=0.1, global_clipnorm=1.0, nonfinite=policy)
    step = Step(opt, variables)
    step(good)
    snapshot = [v.numpy().copy() for v in variables], _opt_values(opt)
    poisoned = [good[0].copy(), good[1].copy()]
    poisoned[0][1, 2] = bad
    step(poisoned)
    return opt, variables, snapshot, good


STATE_STATS = ("grad_norm", "clipped_grad_norm", "clip_threshold", "steps",
               "clipped_steps", "nonfinite_steps")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_changes_no_weight_slot_or_state(bad):
    opt, variables, (weights, opt_vars), _ = _adam_case("skip", bad)
    for w, v in zip(weights, variables):
        np.testing.assert_array_equal(w, v.numpy())
    names = [v.path for v in opt.variables]
    for name, old, new in zip(names, opt_vars, _opt_values(opt)):
        if "iteration" in name or "stats_" in name:
            continue
        np.testing.assert_array_equal(old, new, err_msg=name)
    stats = opt.gradient_stats()
    assert stats["nonfinite_steps"] == 1 and stats["steps"] == 2
    assert stats["clipped_steps"] == 1 and stats["clipped_grad_norm"] == 0.0
    assert not np.isfinite(stats["grad_norm"])
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_zero_applies_a_zero_gradient(bad):
    opt, variables, _, good = _adam_case("zero", bad)
    # Reference: the same two steps with an all-zero second gradient.
    ref_vars = [keras.Variable(np.ones((4, 3), "float32")), keras.Variable(np.ones(3, "float32"))]
    ref = kc.ClippedAdam(learning_rate=0.1, global_clipnorm=1.0)
    ref_step = Step(ref, ref_vars, jit=False)
    ref_step(good)
    ref_step([np.zeros((4, 3), "float32"), np.zeros(3, "float32")])
    for v, r in zip(variables, ref_vars):
        assert np.all(np.isfinite(v.numpy()))
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-6)
    assert opt.gradient_stats()["nonfinite_steps"] == 1


def test_propagate_is_keras_behaviour():
    opt, variables, _, _ = _adam_case("propagate", np.nan)
    assert np.isnan(variables[0].numpy()[1, 2])
    assert opt.gradient_stats()["nonfinite_steps"] == 1


def test_skip_in_fit_keeps_weights_finite():
    model = small_model()
    opt = kc.ClippedAdam(learning_rate=0.01, global_clipnorm=1.0)
    model.compile(optimizer=opt, loss="mse", jit_compile=XLA)
    x, y = data(64)
    y[17] = np.nan  # one batch of 16 holds a NaN target
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert opt.gradient_stats()["nonfinite_steps"] == 1


def test_plain_keras_would_have_nan_weights():
    # The control for the test above: without keras-clip the run is lost.
    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01, global_clipnorm=1.0), loss="mse")
    x, y = data(64)
    y[17] = np.nan
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    assert not all(np.all(np.isfinite(w)) for w in model.get_weights())


# Bad input.


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError,
         "Only one of `clipper`, `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
         "Received: clipnorm=1.0, global_clipnorm=1.0"),
        (dict(clipper="norm", clipvalue=1.0), ValueError, "can be set. Received: clipper='norm', clipvalue=1.0"),
        (dict(clipnorm=0), ValueError, "Received: clipnorm=0"),
        (dict(clipvalue=-1), ValueError, "Received: clipvalue=-1"),
        (dict(global_clipnorm=float("nan")), ValueError, "Received: global_clipnorm=nan"),
        (dict(global_clipnorm=True), TypeError, "Received: global_clipnorm=True"),
        (dict(clipnorm="1"), TypeError, "Received: clipnorm='1'"),
        (dict(clipper="nope"), ValueError, "Received: clipper='nope'"),
        (dict(clipper=1.0), TypeError, "Received: clipper=1.0"),
        (dict(nonfinite="ignore"), ValueError, "Received: nonfinite='ignore'"),
        (dict(nonfinite=None), TypeError, "Received: nonfinite=None"),
    ],
)
def test_bad_arguments(kwargs, err, msg):
    with pytest.raises(err) as info:
        kc.ClippedAdam(**kwargs)
    assert str(info.value).endswith(msg)


def test_a_clipper_belongs_to_one_optimizer():
    clip = kc.GlobalNormClip(1.0)
    grads, variables = _grads_and_vars()
    Step(kc.ClippedSGD(clipper=clip), variables, jit=False)(grads)
    with pytest.raises(ValueError, match="give each optimizer its own clipper"):
        kc.ClippedSGD(clipper=clip)


def test_stats_before_build_is_a_clear_error():
    with pytest.raises(ValueError, match="before its first step"):
        kc.ClippedAdam().gradient_stats()


# Statistics for readers: windows, per-variable norms, probes.


def test_window_statistics_and_per_variable_norms():
    grads, variables = _grads_and_vars()
    opt = kc.ClippedSGD(learning_rate=0.1, global_clipnorm=1.0)
    step = Step(opt, variables)
    step(grads)
    step([g * 2 for g in grads])
    step([np.full((3, 2), np.nan, "float32"), grads[1]])  # skipped, not in the window
    expected = [np.sqrt(24.0), 5.0]  # norms of the two gradients of step 1
    stats = opt.gradient_stats(reset_window=True)
    assert stats["window_steps"] == 2 and stats["steps"] == 3
    total = np.sqrt(24.0 + 25.0)
    np.testing.assert_allclose(stats["window_norm_sum"], 3 * total, rtol=1e-6)
    np.testing.assert_allclose(stats["window_norm_max"], 2 * total, rtol=1e-6)
    after = opt.gradient_stats()
    assert after["window_steps"] == 0 and after["window_norm_max"] == 0.0
    step(grads)
    norms = opt.gradient_norms_by_variable()
    assert list(norms) == [v.path for v in variables]
    np.testing.assert_allclose(list(norms.values()), expected, rtol=1e-6)


@pytest.mark.parametrize("jit", JIT, ids=["jit", "nojit"])
def test_requested_histograms_count_the_raw_gradients_every_freq_updates(jit):
    grads, variables = _grads_and_vars()
    edges = np.array([-1.0, 0.0, 1.0], "float32")  # log10|g| bins
    histograms = stats.GradientHistograms(edges, freq=2, groups={variables[1].path: 0})
    opt = kc.ClippedSGD(learning_rate=0.1, global_clipnorm=1.0)
    opt.build(variables)
    assert opt.record_gradient_histograms(histograms)  # a new request
    assert not opt.record_gradient_histograms(histograms)  # the same one
    # The request's variables are the optimizer's (every backend's step
    # carries them), created by the request, not before.
    assert histograms.counts.dtype == "int32" and histograms.step.dtype == "int32"
    assert tuple(histograms.counts.shape) == (1, len(edges) + 3)
    ids = [id(v) for v in opt.variables]
    assert id(histograms.counts) in ids and id(histograms.step) in ids
    assert histograms.read()[0] == -1  # nothing counted yet
    step = Step(opt, variables, jit)
    # Update 0 is counted (before clipping: |g| = 3 and 4, log10 in [0, 1)).
    step(grads)
    assert histograms.read()[0] == 0
    np.testing.assert_array_equal(histograms.read()[1], [[0, 0, 0, 2, 0, 0]])
    step([g * 100 for g in grads])  # update 1: not counted
    np.testing.assert_array_equal(histograms.read()[1], [[0, 0, 0, 2, 0, 0]])
    step([g * 100 for g in grads])  # update 2: counted (overflow bucket)
    assert histograms.read()[0] == 2
    np.testing.assert_array_equal(histograms.read()[1], [[0, 0, 0, 0, 2, 0]])
    assert opt.record_gradient_histograms(None)
    with pytest.raises(TypeError) as info:
        opt.record_gradient_histograms("every step")
    assert str(info.value).endswith("Received: histograms='every step'")
    assert opt._histograms is None  # nothing was registered


def test_a_file_saved_while_histograms_were_counted_loads_without_a_request(tmp_path):
    # The counts are a reading, not training state: the file holds the same
    # optimizer variables as one saved without a request, so it loads into an
    # optimizer that was never asked for histograms, with every state restored.
    model = small_model()
    opt = kc.ClippedAdam(learning_rate=0.01, clipper=kc.ZClip(warmup_steps=2))
    model.compile(optimizer=opt, loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    histograms = stats.GradientHistograms(
        np.array([-3.0, 0.0, 3.0], "float32"), freq=1,
        groups={v.path: 0 for v in model.trainable_variables},
    )
    assert opt.record_gradient_histograms(histograms)
    model.make_train_function(force=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert histograms.read()[0] == 7 and histograms.read()[1].sum() > 0  # counted
    readings = {id(histograms.counts), id(histograms.step)}
    state = [v for v in opt.variables if id(v) not in readings]
    assert len(state) == len(opt.variables) - 2
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when it drops the state
        loaded = keras.saving.load_model(path)
    assert loaded.optimizer._histograms is None
    restored = loaded.optimizer.variables
    assert [v.path for v in restored] == [v.path for v in state]
    for saved, got in zip(state, restored):
        np.testing.assert_array_equal(got.numpy(), saved.numpy(), err_msg=saved.path)
    assert int(loaded.optimizer.iterations.numpy()) == 8
    assert loaded.optimizer.gradient_stats() == opt.gradient_stats()
    # Both go on the same way.
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", JIT, ids=["jit", "nojit"])
def test_skip_also_skips_weight_decay_and_ema(jit):
    variables = [keras.Variable(np.ones((4, 3), "float32"), name="w")]
    opt = kc.ClippedAdamW(0.1, weight_decay=0.5, use_ema=True,
                          ema_overwrite_frequency=2, global_clipnorm=1.0)
    step = Step(opt, variables, jit)
    step([np.ones((4, 3), "float32")])
    before = variables[0].numpy().copy(), _opt_values(opt)
    step([np.full((4, 3), np.nan, "float32")])  # the step where EMA would overwrite
    np.testing.assert_array_equal(variables[0].numpy(), before[0])
    for v, old, new in zip(opt.variables, before[1], _opt_values(opt)):
        if "iteration" not in v.path and "stats_" not in v.path:
            np.testing.assert_array_equal(old, new, err_msg=v.path)
    step([np.ones((4, 3), "float32")])  # and the next finite step decays again
    assert np.all(variables[0].numpy() < before[0])


class _HalfAboveMean(kc.Clipper):
    """A rule of a user's own, through the one protocol: halve every
    gradient whose norm is above the mean of the norms of the steps so far."""

    def init_state(self, variables):
        return {"total": np.float32(0.0), "count": np.float32(0.0)}

    def update(self, grads, state, params=None, *, step=None, sums=None):
        norm = keras.ops.sqrt(keras.ops.sum(self._sums(grads, state, step, sums)[:, 0]))
        mean = state["total"] / keras.ops.maximum(state["count"], 1.0)
        over = keras.ops.logical_and(state["count"] > 0, norm > mean)
        factor = keras.ops.where(over, 0.5, 1.0)
        new_state = {"total": state["total"] + norm, "count": state["count"] + 1.0}
        info = {"clipped": over, "clipped_norm": norm * factor}
        return kc.ops.scale(grads, factor), new_state, info


@pytest.mark.parametrize("jit", JIT, ids=["jit", "nojit"])
def test_a_clipper_of_ones_own_runs_in_the_step(jit):
    variables = [keras.Variable(np.zeros(2, "float32"))]
    opt = kc.ClippedSGD(learning_rate=1.0, clipper=_HalfAboveMean())
    step = Step(opt, variables, jit)
    moves = []
    for scale in (1.0, 2.0, 1.0, np.nan, 4.0):  # norms 5, 10, 5, NaN, 20
        before = variables[0].numpy().copy()
        step([np.array([3.0, 4.0], "float32") * np.float32(scale)])
        moves.append(float(np.linalg.norm(variables[0].numpy() - before)))
    # Above the running mean (5, 7.5; 20 > 6.67): halved; the NaN step skipped
    # and kept out of the state.
    assert moves == [5.0, 5.0, 5.0, 0.0, 10.0]
    stats = opt.gradient_stats()
    assert stats["clipped_steps"] == 2 and stats["nonfinite_steps"] == 1
    assert float(opt.clipper._state_variables["count"].numpy()) == 4.0


def test_every_builtin_class_is_defined_in_the_source_for_tools_to_see():
    import ast
    import pathlib

    from keras_clip import optimizers

    tree = ast.parse(pathlib.Path(optimizers.__file__).read_text())
    # (at the top level, or under an `if` for optimizers only some Keras has)
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    expected = {f"Clipped{name}" for name in builtin_optimizer_classes()}
    assert expected <= defined, "a Keras optimizer has no Clipped class in the source"
    assert set(BUILTIN) == expected
    for name, cls in builtin_optimizer_classes().items():
        new = BUILTIN[f"Clipped{name}"]
        assert new.__bases__ == (kc.ClippingMixin, cls)
        assert kc.clipped(cls) is new
        # The docstring shows the base's arguments and keras-clip's.
        assert "learning_rate" in new.__doc__ and "nonfinite" in new.__doc__
        assert ">>>" not in new.__doc__  # the base's examples are not doctests here


@pytest.mark.parametrize("jit", JIT, ids=["jit", "nojit"])
@pytest.mark.parametrize(
    "make",
    [lambda: kc.ValueClip(0.5), lambda: kc.NormClip(1.0),
     lambda: kc.AdaptiveGradClip(0.05, exclude="bias")],
    ids=["value", "norm", "agc"],
)
def test_a_separable_rule_clipped_per_tensor_equals_the_list(make, jit):
    """The seam: clipping each tensor right before its update (`separable`)
    is the same rule as clipping the list first, to the last bit."""
    rng = np.random.default_rng(0)
    shapes = {"kernel": (64, 32), "bias": (32,), "emb": (300, 256)}
    start = {k: rng.standard_normal(s).astype("float32") for k, s in shapes.items()}
    grads = [rng.standard_normal(s).astype("float32") * 3 for s in shapes.values()]
    results = []
    for separable in (True, False):
        clipper = make()
        clipper.separable = separable  # (not a setting: only the execution)
        variables = [keras.Variable(v, name=k) for k, v in start.items()]
        opt = kc.ClippedSGD(learning_rate=1.0, clipper=clipper)
        Step(opt, variables, jit)(grads)
        results.append(([v.numpy() for v in variables], opt.gradient_stats()))
    (fused, fused_stats), (listed, listed_stats) = results
    for a, b in zip(fused, listed):
        np.testing.assert_array_equal(a, b)
    assert fused_stats["clipped_steps"] == listed_stats["clipped_steps"] == 1
    # The clipped norm is combined from per-tensor norms on one side: sqrt
    # and square round once each (2 u), on a sum of 3 float32 terms (2 u).
    np.testing.assert_allclose(
        fused_stats["clipped_grad_norm"], listed_stats["clipped_grad_norm"], rtol=5 * 2**-24
    )
    assert any(not np.array_equal(a, s) for a, s in zip(fused, start.values()))
