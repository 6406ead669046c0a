"""Clipping sees what a single-device, full-precision step would see.

Mixed precision, gradient accumulation, sparse gradients, weight decay and
EMA, and a guard on the Keras internals keras-clip hooks into. (Multi-device
and multi-worker: tests/test_distributed.py.)
"""

import inspect

import keras
import numpy as np
import pytest

import keras_clip as kc

TF = keras.backend.backend() == "tensorflow"

CLIPPERS = {
    "value": lambda: kc.ValueClip(0.05),
    "norm": lambda: kc.NormClip(0.3),
    "global_norm": lambda: kc.GlobalNormClip(0.5),
    "agc": lambda: kc.AdaptiveGradClip(0.02),
    "autoclip": lambda: kc.AutoClip(50.0, history_size=8),
    "zclip": lambda: kc.ZClip(warmup_steps=2, z_thresh=0.5),
    "adagc": lambda: kc.AdaGC(warmup_steps=2, relative_factor=1.0),
}


def dense_model(dtype=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="tanh", dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def data(n=32, scale=3.0):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 2)) * scale).astype("float32")
    return x, y


# Mixed precision.


def _float32_first_step_norm():
    model = dense_model()
    opt = kc.ClippedSGD(0.1, global_clipnorm=1.0)
    model.compile(opt, "mse")
    x, y = data()
    model.train_on_batch(x, y)
    return opt.gradient_stats()["grad_norm"]


@pytest.mark.parametrize("explicit", [False, True], ids=["policy", "explicit"])
def test_mixed_precision_clips_unscaled_gradients(explicit):
    reference = _float32_first_step_norm()
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = dense_model()
    inner = kc.ClippedSGD(0.1, global_clipnorm=1.0)
    opt = keras.optimizers.LossScaleOptimizer(inner) if explicit else inner
    model.compile(opt, "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is inner
    x, y = data()
    # The loss scale starts at 2**15 and halves on each overflowing step,
    # which the LossScaleOptimizer skips without calling the inner one: let it
    # settle. Skipped steps leave the weights alone, so the first applied step
    # sees the initial weights, like the float32 reference.
    for _ in range(20):
        model.train_on_batch(x, y)
        if inner.built and inner.gradient_stats()["steps"]:
            break
    stats = inner.gradient_stats()
    assert stats["steps"] == 1
    scale = float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    assert 1.0 < scale <= 2.0**15
    # The clipper saw the unscaled gradient: the float32 norm, not `scale` x it.
    assert stats["grad_norm"] == pytest.approx(reference, rel=1e-2)
    assert stats["clipped_grad_norm"] == pytest.approx(1.0, rel=1e-3)
    # And it keeps doing so over a run, while the loss scale moves.
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert inner.gradient_stats()["clipped_grad_norm"] == pytest.approx(1.0, rel=1e-3)


def test_float16_gradients_do_not_overflow_the_norm():
    variable = keras.Variable(np.zeros(1000, "float16"), dtype="float16")
    grad = np.full(1000, 300.0, "float16")
    opt = kc.ClippedSGD(0.5, global_clipnorm=1.0)
    step = lambda: opt.apply([grad], [variable])  # noqa: E731
    if TF:  # and compiled by XLA, as model.fit would
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    step()
    stats = opt.gradient_stats()
    assert stats["grad_norm"] == pytest.approx(300 * np.sqrt(1000), rel=1e-4)
    assert stats["nonfinite_steps"] == 0
    moved = np.asarray(keras.ops.convert_to_numpy(variable), "float64")
    assert np.all(np.isfinite(moved))
    assert np.linalg.norm(moved) == pytest.approx(0.5, rel=1e-2)


# Gradient accumulation: clip once per update, the averaged gradient.


# XLA compiles the nested conds of accumulation slowly (~12 s a case): every
# clipper runs without it, two with it. (On torch, `jit_compile=True` is
# torch.compile: 45-105 s a case on CPU; the eager cases cover torch.)
COMPILED = [pytest.mark.tensorflow, pytest.mark.jax(
    reason="on torch, jit_compile=True is torch.compile: 45-105 s a case; eager covers torch"
)]
ACCUMULATION = [(n, False) for n in CLIPPERS] + [
    pytest.param(n, True, marks=COMPILED) for n in ("global_norm", "zclip")
]


@pytest.mark.parametrize("name, jit", ACCUMULATION)
def test_accumulation_equals_one_big_batch(name, jit):
    x, y = data(n=96)
    big = dense_model()
    big.compile(kc.ClippedAdam(0.05, clipper=CLIPPERS[name]()), "mse", jit_compile=jit)
    big.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    small = dense_model()
    opt = kc.ClippedAdam(0.05, clipper=CLIPPERS[name](), gradient_accumulation_steps=4)
    small.compile(opt, "mse", jit_compile=jit)
    small.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    for a, b in zip(big.get_weights(), small.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert opt.gradient_stats()["steps"] == 3  # updates, not micro-steps
    assert big.optimizer.gradient_stats()["clipped_steps"] == opt.gradient_stats()["clipped_steps"]


# Sparse gradients.


def _sparse_case(clipper, sparse):
    import tensorflow as tf

    table = keras.Variable(np.ones((10, 3), "float32"), name="table")
    indices = tf.constant([1, 4, 1, 7, 1])  # index 1 three times
    values = tf.constant(np.arange(15, dtype="float32").reshape(5, 3) - 7)
    grad = tf.IndexedSlices(values, indices, tf.constant([10, 3]))
    if not sparse:
        grad = tf.convert_to_tensor(grad)
    types = []

    class Spy(kc.ClippedSGD):
        def update_step(self, gradient, variable, learning_rate):
            types.append(type(gradient).__name__)
            return super().update_step(gradient, variable, learning_rate)

    opt = Spy(0.1, clipper=clipper)
    tf.function(lambda: opt.apply([grad], [table]), jit_compile=False)()
    return table.numpy(), opt.gradient_stats(), types


@pytest.mark.tensorflow(reason="tf.IndexedSlices: only TensorFlow has sparse gradients")
@pytest.mark.parametrize("name", CLIPPERS)
def test_sparse_norms_and_updates_equal_dense(name):
    dense_w, dense_stats, _ = _sparse_case(CLIPPERS[name](), sparse=False)
    sparse_w, sparse_stats, types = _sparse_case(CLIPPERS[name](), sparse=True)
    np.testing.assert_allclose(sparse_w, dense_w, rtol=1e-6)
    for key in ("grad_norm", "clipped_grad_norm", "clip_threshold"):
        assert sparse_stats[key] == pytest.approx(dense_stats[key], rel=1e-6)
    assert set(types) == {"IndexedSlices"}  # the update stays sparse (each trace)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("name", CLIPPERS)
def test_embedding_model_fits(name, jit):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (64, 12))
    y = rng.standard_normal((64, 1)).astype("float32")
    model = keras.Sequential([
        keras.Input((12,), dtype="int32"),
        keras.layers.Embedding(30, 8),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])
    opt = kc.ClippedSGD(0.1, clipper=CLIPPERS[name]())
    model.compile(opt, "mse", jit_compile=jit)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert opt.gradient_stats()["steps"] == 8


# Weight decay and EMA behave as in the base optimizer.


def _run_two(opt, grads_list):
    variables = [keras.Variable(np.full((3, 2), 2.0, "float32")),
                 keras.Variable(np.full((2,), -1.0, "float32"))]
    for grads in grads_list:
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables], opt


GRADS = [[np.full((3, 2), 3.0, "float32"), np.array([4.0, -4.0], "float32")],
         [np.full((3, 2), -1.0, "float32"), np.array([0.5, 2.0], "float32")],
         [np.full((3, 2), 0.2, "float32"), np.array([9.0, 1.0], "float32")]]


@pytest.mark.parametrize(
    "kwargs",
    [dict(weight_decay=0.1),
     dict(weight_decay=0.1, global_clipnorm=1.0),
     dict(weight_decay=0.05, clipnorm=0.5),
     dict(use_ema=True, ema_momentum=0.5),
     dict(use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2, clipvalue=1.0)],
    ids=["decay", "decay+global", "decay+norm", "ema", "ema-overwrite+value"],
)
def test_weight_decay_and_ema_match_keras(kwargs):
    # Single device: Keras's own clipping is correct, so it is the reference.
    ours, opt = _run_two(kc.ClippedAdamW(0.1, **kwargs), GRADS)
    theirs, ref = _run_two(keras.optimizers.AdamW(0.1, **kwargs), GRADS)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    if kwargs.get("use_ema"):
        for a, b in zip(opt._model_variables_moving_average, ref._model_variables_moving_average):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                       keras.ops.convert_to_numpy(b), rtol=1e-6)


def test_clipping_never_touches_the_decay_term():
    # A huge weight with weight decay: the decay moves it by lr * wd * w even
    # though the gradient is clipped to a tiny norm.
    w = keras.Variable(np.array([1000.0], "float32"))
    opt = kc.ClippedSGD(0.1, weight_decay=0.5, global_clipnorm=1e-3)
    opt.apply([np.array([5.0], "float32")], [w])
    assert float(keras.ops.convert_to_numpy(w)[0]) == pytest.approx(1000.0 * (1 - 0.05) - 0.1 * 1e-3, rel=1e-6)


TF_JIT = pytest.param(True, id="jit", marks=pytest.mark.tensorflow(
    reason="compiles optimizer.apply with tf.function(jit_compile=True): XLA through TensorFlow"))


@pytest.mark.parametrize("jit", [TF_JIT, pytest.param(False, id="nojit")])
def test_agc_sees_the_weights_before_decay(jit):
    # Step order: clip, then decay. AGC clips each gradient right before its
    # variable's update, with the weight as it was before this step's decay:
    # unit norm 5 -> bound 0.1 * 5 = 0.5, so g = (30, 40) becomes (0.3, 0.4).
    w = keras.Variable(np.array([[3.0], [4.0]], "float32"))
    opt = kc.ClippedSGD(0.1, weight_decay=0.5, clipper=kc.AdaptiveGradClip(0.1))
    opt.build([w])
    step = lambda grads: opt.apply(grads, [w])  # noqa: E731
    if jit:
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    step([np.array([[30.0], [40.0]], "float32")])
    decayed = np.array([[3.0], [4.0]]) * (1 - 0.5 * 0.1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w), decayed - 0.1 * np.array([[0.3], [0.4]]), rtol=1e-6)
    assert opt.gradient_stats()["clipped_grad_norm"] == pytest.approx(0.5, rel=1e-6)


# Guard (the list of internals and its checks: tests/test_backend.py).


def test_guard_update_steps_assign_through_the_optimizer():
    """Skipping masks `Optimizer.assign*`; an update step that assigned a
    variable directly would escape the mask."""
    import re

    from keras_clip.optimizers import builtin_optimizer_classes

    direct = re.compile(r"(?<!self)\.(assign|assign_add|assign_sub|scatter_\w+)\(")
    for name, cls in builtin_optimizer_classes().items():
        for method in ("update_step", "_muon_update_step", "_adamw_update_step"):
            fn = getattr(cls, method, None)
            if fn is None:
                continue
            hits = [line.strip() for line in inspect.getsource(fn).splitlines()
                    if direct.search(line)]
            assert not hits, f"{name}.{method} assigns directly: {hits}"
