"""AutoClip, ZClip and AdaGC against NumPy loops written from their rules.

The loops call `clipper.update` compiled as the backend compiles a step
(tests/steps.py: XLA on TensorFlow and JAX, eager on torch); training runs
Keras's `fit` the backend's way.
"""

import math
import os

import keras
import numpy as np
import pytest
import steps
from keras import ops

import keras_clip as kc
from keras_clip import clippers

SHAPES = [(), (6,), (4, 3), (2, 2, 1, 3)]
STEPS = 300
NAN_STEP, ZERO_STEPS, SPIKES = 150, (40, 200), (60, 61, 130, 220, 280)


def sequence(seed=0):
    """300 gradient lists with a drifting scale, spikes, zero steps, one NaN."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        scale = 1.0 + 0.5 * math.sin(t / 20) + 0.1 * rng.random()
        grads = [(rng.standard_normal(s) * scale).astype("float32") for s in SHAPES]
        if t in SPIKES:
            grads = [g * 40 for g in grads]
        if t in ZERO_STEPS:
            grads = [np.zeros_like(g) for g in grads]
        if t == NAN_STEP:
            grads[2][1, 1] = np.nan
        out.append(grads)
    return out


def norms64(grads):
    per = np.array([np.sqrt(np.sum(np.square(g.astype(np.float64)))) for g in grads])
    return per, float(np.sqrt(np.sum(per**2)))


# NumPy references, one step at a time: each returns (threshold, state) and
# the clipped global norm follows from the rule.


class RefAutoClip:
    def __init__(self, percentile, history_size):
        self.p, self.size, self.history, self.threshold = percentile, history_size, [], 0.0

    def step(self, grads):
        _, g = norms64(grads)
        if math.isfinite(g):
            self.history = (self.history + [g])[-self.size:]
            self.threshold = float(np.percentile(self.history, self.p))
        return self.threshold, min(g, self.threshold)


class RefZClip:
    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
                 skip_update_on_spike=False, epsilon=1e-6):
        self.__dict__.update(locals())
        self.buffer, self.mean, self.var, self.threshold = [], 0.0, 0.0, 0.0

    def step(self, grads):
        _, g = norms64(grads)
        if not math.isfinite(g):
            return self.threshold, g
        if len(self.buffer) < self.warmup_steps:
            self.buffer.append(g)
            threshold = g
            if len(self.buffer) == self.warmup_steps:
                self.mean, self.var = np.mean(self.buffer), np.var(self.buffer)
        else:
            std = math.sqrt(self.var)
            if self.mode == "zscore":
                z = (g - self.mean) / (std + self.epsilon)
                spike = z > self.z_thresh
                if self.clip_option == "adaptive_scaling":
                    a = self.clip_factor * (self.mean + self.z_thresh * std / (z / self.z_thresh)) if spike else None
                else:
                    a = self.mean
            else:
                a = self.mean + self.z_thresh * std
                spike = g > a
            threshold = a if spike else g
            if not (spike and self.skip_update_on_spike):
                x = a if spike else g
                self.mean = self.alpha * self.mean + (1 - self.alpha) * x
                self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        if self.max_norm is not None:
            threshold = min(threshold, self.max_norm)
        self.threshold = threshold
        return threshold, min(g, threshold)


class RefAdaGC:
    def __init__(self, relative_factor=1.05, beta=0.98, max_norm=1.0, warmup_steps=100):
        self.__dict__.update(locals())
        self.gamma, self.count, self.threshold = None, 0, 0.0

    def step(self, grads):
        per, g = norms64(grads)
        if self.gamma is None:
            self.gamma = np.full(len(per), np.inf)
        if not math.isfinite(g):
            return self.threshold, None
        if self.count < self.warmup_steps:
            new = per * min(1.0, self.max_norm / g) if g > 0 else per
            gamma = np.minimum(self.gamma, new)
            self.threshold = self.max_norm
        else:
            local = self.relative_factor * self.gamma
            new = np.array([n * min(1.0, l / n) if n > 0 else n for n, l in zip(per, local)])
            gamma = self.beta * self.gamma + (1 - self.beta) * new
            self.threshold = float(np.sqrt(np.sum(local**2)))
        self.gamma = np.where(per > 0, gamma, self.gamma)
        self.count += 1
        return self.threshold, float(np.sqrt(np.sum(new**2)))


CASES = {
    "autoclip": (lambda: kc.AutoClip(25.0, history_size=50), lambda: RefAutoClip(25.0, 50)),
    "autoclip-defaults": (lambda: kc.AutoClip(), lambda: RefAutoClip(10.0, 1000)),
    "zclip": (lambda: kc.ZClip(), lambda: RefZClip()),
    "zclip-mean-maxnorm": (
        lambda: kc.ZClip(clip_option="mean", max_norm=4.0, warmup_steps=10),
        lambda: RefZClip(clip_option="mean", max_norm=4.0, warmup_steps=10),
    ),
    "zclip-percentile-skip": (
        lambda: kc.ZClip(mode="percentile", skip_update_on_spike=True, alpha=0.9, z_thresh=2.0),
        lambda: RefZClip(mode="percentile", skip_update_on_spike=True, alpha=0.9, z_thresh=2.0),
    ),
    "zclip-scaled": (
        lambda: kc.ZClip(clip_factor=0.7, z_thresh=1.5),
        lambda: RefZClip(clip_factor=0.7, z_thresh=1.5),
    ),
    "adagc": (lambda: kc.AdaGC(warmup_steps=20), lambda: RefAdaGC(warmup_steps=20)),
}


@pytest.mark.parametrize("case", CASES)
def test_300_steps_match_the_numpy_rule(case):
    make, make_ref = CASES[case]
    clipper, ref = make(), make_ref()
    params = [np.zeros(s, "float32") for s in SHAPES]
    state = {k: ops.convert_to_tensor(v) for k, v in clipper.init_state(params).items()}
    update = steps.compiled(lambda g, s: clipper.update(g, s, params))
    clipped_any = 0
    for t, grads in enumerate(sequence()):
        out, state, info = update([ops.convert_to_tensor(g) for g in grads], state)
        threshold, clipped_norm = ref.step(grads)
        np.testing.assert_allclose(
            float(state["threshold"]), threshold, rtol=1e-5, err_msg=f"step {t}"
        )
        if t == NAN_STEP:
            continue
        np.testing.assert_allclose(
            float(info["clipped_norm"]), clipped_norm, rtol=1e-5, atol=1e-6,
            err_msg=f"step {t}",
        )
        _, out_norm = norms64([np.asarray(o) for o in out])
        np.testing.assert_allclose(out_norm, clipped_norm, rtol=1e-5, atol=1e-6)
        clipped_any += bool(info["clipped"])
        if isinstance(ref, RefZClip):
            np.testing.assert_allclose(float(state["mean"]), ref.mean, rtol=1e-5)
            np.testing.assert_allclose(float(state["var"]), ref.var, rtol=1e-4, atol=1e-7)
            n = len(ref.buffer)
            np.testing.assert_allclose(np.asarray(state["buffer"])[:n], ref.buffer, rtol=1e-5)
        if isinstance(ref, RefAutoClip):
            n = len(ref.history)
            kept = np.sort(np.asarray(state["history"])[: min(int(state["count"]), ref.size)])
            np.testing.assert_allclose(kept, np.sort(ref.history), rtol=1e-5)
            assert n == min(int(state["count"]), ref.size)
            # The history kept in order: exactly its sort, then +inf pads.
            ordered = np.asarray(state["sorted"])
            np.testing.assert_array_equal(ordered[:n], kept, err_msg=f"step {t}")
            assert np.all(ordered[n:] == np.inf), t
        if isinstance(ref, RefAdaGC):
            np.testing.assert_allclose(np.asarray(state["gamma"]), ref.gamma, rtol=1e-5)
    # The NaN step entered no state: 299 finite steps counted.
    assert int(state["count"]) == STEPS - 1
    assert clipped_any > 0


def test_autoclip_keeps_its_history_in_order_through_ties_and_nan():
    # Norms from a set of three values: every eviction and insertion meets
    # ties; a NaN step leaves the history and its order alone.
    clip = kc.AutoClip(percentile=50.0, history_size=7)
    state = {k: ops.convert_to_tensor(v) for k, v in clip.init_state([]).items()}
    update = steps.compiled(lambda g, s: clip.update([g], s))
    values = np.random.default_rng(3).choice([1.0, 2.0, 3.0], 120).astype("float32")
    values[[10, 50]] = np.nan
    kept = []
    for t, v in enumerate(values):
        _, state, _ = update(ops.convert_to_tensor([v]), state)
        if not np.isnan(v):
            kept = (kept + [v])[-7:]
        ordered = np.asarray(state["sorted"])
        np.testing.assert_array_equal(ordered[: len(kept)], np.sort(kept), err_msg=f"step {t}")
        assert np.all(ordered[len(kept):] == np.inf), t
        assert float(state["threshold"]) == np.percentile(kept, 50.0), t


def test_autoclip_first_step_never_clips():
    clip = kc.AutoClip()
    grads = [np.full((3,), 100.0, "float32")]
    state = clip.init_state(grads)
    out, _, info = clip.update(grads, state)
    np.testing.assert_array_equal(np.asarray(out[0]), grads[0])
    assert not bool(info["clipped"])


# Save and resume inside model.fit equals a run that never stopped.

ADAPTIVE = {
    "autoclip": lambda: kc.AutoClip(percentile=50.0, history_size=16),
    "zclip": lambda: kc.ZClip(warmup_steps=5, z_thresh=1.0),
    "adagc": lambda: kc.AdaGC(warmup_steps=5),
}


def rnn(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 3))
    x = keras.layers.SimpleRNN(8, activation="relu", name="rnn")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def rnn_data(n=64, bad_batch=None, batch=8):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 12, 3)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None].astype("float32")
    if bad_batch is not None:
        x[bad_batch * batch:(bad_batch + 1) * batch] *= 100
    return x, y


@pytest.mark.parametrize("name", ADAPTIVE)
def test_save_and_resume_equals_uninterrupted(name, tmp_path):
    x, y = rnn_data()
    fit = dict(batch_size=8, verbose=0, shuffle=False)

    straight = rnn()
    straight.compile(
        kc.ClippedAdam(0.01, clipper=ADAPTIVE[name]()), "mse",
        jit_compile=steps.FIT_JIT_COMPILE,
    )
    straight.fit(x, y, epochs=4, **fit)

    first = rnn()
    first.compile(
        kc.ClippedAdam(0.01, clipper=ADAPTIVE[name]()), "mse",
        jit_compile=steps.FIT_JIT_COMPILE,
    )
    first.fit(x, y, epochs=2, **fit)
    path = os.path.join(tmp_path, "half.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    resumed.fit(x, y, epochs=2, **fit)

    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    assert straight.optimizer.gradient_stats()["steps"] == 32


# A bad batch: the weights' change stays within the adaptive bound.


class Deltas(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.last = [w.numpy().copy() for w in self.model.trainable_weights]
        self.deltas, self.thresholds = [], []

    def on_train_batch_end(self, batch, logs=None):
        now = [w.numpy().copy() for w in self.model.trainable_weights]
        self.deltas.append(math.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(now, self.last))))
        self.last = now
        opt = self.model.optimizer
        if isinstance(opt, kc.ClippingMixin):
            self.thresholds.append(opt.gradient_stats()["clip_threshold"])


BAD = 28  # batch 28 of 32 (8 samples each) has its inputs times 100


def run_with_bad_batch(opt):
    model = rnn()
    model.compile(opt, "mse", jit_compile=steps.FIT_JIT_COMPILE)
    x, y = rnn_data(n=256, bad_batch=BAD)
    record = Deltas()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[record])
    return record


def typical(deltas):
    return np.median(deltas[BAD - 8:BAD])


def test_plain_optimizers_jump_on_the_bad_batch():
    # The control: without clipping the bad batch moves the weights.
    sgd = run_with_bad_batch(keras.optimizers.SGD(0.01))
    assert sgd.deltas[BAD] > 20 * typical(sgd.deltas)
    adam = run_with_bad_batch(keras.optimizers.Adam(0.01))
    assert adam.deltas[BAD] > 1.8 * typical(adam.deltas)  # measured 2.2


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_clipping_bounds_the_bad_batch(name):
    lr = 0.01
    record = run_with_bad_batch(kc.ClippedSGD(lr, clipper=ADAPTIVE[name]()))
    # SGD moves the weights by lr * (clipped norm) <= lr * threshold, every step.
    for t, (delta, threshold) in enumerate(zip(record.deltas, record.thresholds)):
        assert delta <= lr * threshold * (1 + 1e-4) + 1e-7, t
    assert record.deltas[BAD] < 3 * typical(record.deltas)
    adam = run_with_bad_batch(kc.ClippedAdam(lr, clipper=ADAPTIVE[name]()))
    assert adam.deltas[BAD] < 1.4 * typical(adam.deltas)  # measured 0.9-1.2


@pytest.mark.parametrize(
    "make, err, msg",
    [
        (lambda: kc.AutoClip(percentile=0), ValueError, "Received: percentile=0"),
        (lambda: kc.AutoClip(percentile=100.5), ValueError, "Received: percentile=100.5"),
        (lambda: kc.AutoClip(history_size=0), ValueError, "Received: history_size=0"),
        (lambda: kc.AutoClip(history_size=2.5), TypeError, "Received: history_size=2.5"),
        (lambda: kc.ZClip(alpha=1.0), ValueError, "Received: alpha=1.0"),
        (lambda: kc.ZClip(alpha=0), ValueError, "Received: alpha=0"),
        (lambda: kc.ZClip(z_thresh=0), ValueError, "Received: z_thresh=0"),
        (lambda: kc.ZClip(warmup_steps=0), ValueError, "Received: warmup_steps=0"),
        (lambda: kc.ZClip(mode="median"), ValueError, "Received: mode='median'"),
        (lambda: kc.ZClip(clip_option="max"), ValueError, "Received: clip_option='max'"),
        (lambda: kc.ZClip(skip_update_on_spike=1), TypeError, "Received: skip_update_on_spike=1"),
        (lambda: kc.ZClip(max_norm=-1), ValueError, "Received: max_norm=-1"),
        (lambda: kc.AdaGC(beta=1.5), ValueError, "Received: beta=1.5"),
        (lambda: kc.AdaGC(relative_factor="big"), TypeError, "Received: relative_factor='big'"),
        (lambda: kc.AdaGC(relative_factor=0.5), ValueError, "Received: relative_factor=0.5"),
        (lambda: kc.AdaGC(relative_factor=0.999), ValueError, "Received: relative_factor=0.999"),
        (lambda: kc.AdaGC(relative_factor=-1), ValueError, "Received: relative_factor=-1"),
        (lambda: kc.AdaGC(warmup_steps=0), ValueError, "Received: warmup_steps=0"),
    ],
)
def test_bad_arguments(make, err, msg):
    with pytest.raises(err) as info:
        make()
    assert str(info.value).endswith(msg)


def test_adagc_relative_factor_below_one_is_refused_and_one_is_allowed():
    with pytest.raises(ValueError, match=r"`relative_factor` must be at least 1") as info:
        kc.AdaGC(relative_factor=0.5)
    assert str(info.value).endswith("Received: relative_factor=0.5")
    assert kc.AdaGC(relative_factor=1).relative_factor == 1.0
    assert kc.AdaGC(relative_factor=1.05).relative_factor == 1.05


@pytest.mark.parametrize("name, cls", [("autoclip", kc.AutoClip), ("zclip", kc.ZClip), ("adagc", kc.AdaGC)])
def test_strings_and_round_trip(name, cls):
    clip = clippers.get(name)
    assert type(clip) is cls
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(clip))
    assert revived.get_config() == clip.get_config()
    opt = kc.ClippedAdam(clipper=name)
    assert kc.ClippedAdam.from_config(opt.get_config()).get_config() == opt.get_config()


# Thresholds set mid-training: variables, read by the next step.


@pytest.mark.parametrize("path", steps.PATHS)
@pytest.mark.parametrize(
    "make, start",
    [(lambda: kc.ZClip(), None), (lambda: kc.AdaGC(max_norm=100.0), 100.0)],
    ids=["zclip", "adagc"],
)
def test_max_norm_set_mid_training_takes_effect_without_retracing(make, start, path):
    # Both clip to `max_norm` in their warm-up (ZClip caps its threshold,
    # AdaGC clips globally to it): a gradient of norm 5 is left alone under
    # the first bound and clipped to exactly the new one after the change.
    # A compiled step (JAX's too, which takes the optimizer's variables as
    # arguments) reads the new bound without tracing again.
    clipper = make()
    variables = [keras.Variable(np.zeros(2, "float32"))]
    opt = kc.ClippedSGD(learning_rate=1.0, clipper=clipper)
    opt.build(variables)
    step = steps.compiled_apply(opt, variables, path)

    def moved_by(bound):
        clipper.max_norm = bound
        variables[0].assign(np.zeros(2, "float32"))
        step([np.array([3.0, 4.0], "float32")])
        return float(np.linalg.norm(variables[0].numpy()))

    assert moved_by(start) == 5.0
    np.testing.assert_allclose(moved_by(1.0), 1.0, rtol=2**-22)  # a scale and a norm
    assert opt.gradient_stats()["clip_threshold"] == 1.0
    assert moved_by(start) == 5.0
    assert step.traces == (1 if path in steps.COMPILED else 3)


def test_a_setting_compiled_into_the_step_cannot_change_once_built():
    clipper = kc.ZClip()
    clipper.z_thresh = 3.0  # before the optimizer is built: a new setting
    assert clipper.get_config()["z_thresh"] == 3.0
    opt = kc.ClippedSGD(clipper=clipper)
    opt.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError) as info:
        clipper.z_thresh = 2.0
    assert "cannot change once it is built" in str(info.value)
    assert str(info.value).endswith("Received: z_thresh=2.0")
    assert clipper.z_thresh == 3.0
    clipper.max_norm = 2.0  # a threshold: allowed
    with pytest.raises(ValueError, match="Received: max_norm=-1"):
        clipper.max_norm = -1
