"""Trains a few steps on JAX with keras.distribution.DataParallel on two CPU
devices, and the same on one device; prints JSON.

Used by tests/test_backends.py in a subprocess: XLA must split the CPU into
two devices before JAX starts.

    python backends_jax_data_parallel.py float32   # one device and two
    python backends_jax_data_parallel.py float64   # one device, with the
                                                   # run's amplification
"""

import json
import os
import sys

DTYPE = sys.argv[1]
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)

import jax

if DTYPE == "float64":
    jax.config.update("jax_enable_x64", True)

import keras
import numpy as np

import keras_clip as kc

keras.config.set_floatx(DTYPE)

STEPS, BATCH = 3, 16
U32 = 2.0**-24

# Thresholds small for these gradients, and the targets of step t scaled by
# 4**t (growing norms), so every rule clips every step it can (AutoClip never
# clips its first step).
CASES = {
    "value": lambda: kc.ClippedSGD(1.0, clipper=kc.ValueClip(0.05)),
    "norm": lambda: kc.ClippedSGD(1.0, clipper=kc.NormClip(0.5)),
    "global_norm": lambda: kc.ClippedSGD(1.0, clipper=kc.GlobalNormClip(1.0)),
    "agc": lambda: kc.ClippedSGD(1.0, clipper=kc.AdaptiveGradClip(0.05)),
    "autoclip": lambda: kc.ClippedSGD(1.0, clipper=kc.AutoClip(50.0, history_size=4)),
    "zclip": lambda: kc.ClippedSGD(1.0, clipper=kc.ZClip(warmup_steps=1, max_norm=1.0)),
    "adagc": lambda: kc.ClippedSGD(1.0, clipper=kc.AdaGC(warmup_steps=1, max_norm=1.0)),
    "nan_skip": lambda: kc.ClippedAdam(0.1, global_clipnorm=1.0),
}


def data(case):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * STEPS, 5))
    y = x @ rng.standard_normal((5, 2)) * 10
    y *= np.repeat(4.0 ** np.arange(STEPS), BATCH)[:, None]
    if case == "nan_skip":
        x[BATCH + 3, 0] = np.nan  # step 2, in the first device's half
    # The same float32 numbers in both dtypes.
    return x.astype("float32").astype(DTYPE), y.astype("float32").astype(DTYPE)


def start_weights():
    keras.utils.set_random_seed(1)
    return [np.asarray(w, "float32") for w in new_model("float32").get_weights()]


def new_model(dtype):
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh", dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


class Steps(keras.callbacks.Callback):
    """The weights after each step, and whether every device holds the same."""

    def __init__(self):
        super().__init__()
        self.weights, self.agree = [], True

    def on_train_batch_end(self, batch, logs=None):
        model = self.model
        self.weights.append([np.asarray(w, "float64").tolist() for w in model.get_weights()])
        for v in model.weights:
            shards = [np.asarray(s.data) for s in v.value.addressable_shards]
            self.agree &= all(np.array_equal(shards[0], s) for s in shards)


def run(case, start, devices=None):
    x, y = data(case)
    model = new_model(DTYPE)
    model.set_weights([w.astype(DTYPE) for w in start])
    model.compile(optimizer=CASES[case](), loss="mse", jit_compile=True)
    steps = Steps()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[steps])
    return {
        "steps": steps.weights,
        "agree": bool(steps.agree),
        "devices": len(model.weights[0].value.addressable_shards),
        "stats": model.optimizer.gradient_stats(),
    }


def main():
    start = start_weights()
    x, y = data("value")
    out = {
        "start": [w.tolist() for w in start], "devices": len(jax.devices()),
        "first_batch": [x[:BATCH].tolist(), y[:BATCH].tolist()],
    }
    rng = np.random.default_rng(2)
    for case in CASES:
        if DTYPE == "float32":
            one = run(case, start)
            distribution = keras.distribution.DataParallel(devices=jax.devices())
            with distribution.scope():
                two = run(case, start)
            out[case] = {"one": one, "two": two}
        else:
            # How much the run magnifies a relative error of u in its
            # weights: the run again from weights perturbed by u (random
            # signs), after the first step and after the last.
            exact = run(case, start)
            perturbed = run(case, [
                w.astype("float64") * (1 + U32 * rng.choice([-1.0, 1.0], w.shape))
                for w in start
            ])
            amplification = [
                max(
                    float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(b))
                    for a, b in zip(p, e)
                ) / U32
                for p, e in zip(perturbed["steps"], exact["steps"])
            ]
            out[case] = {"one": exact, "amplification": amplification}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
