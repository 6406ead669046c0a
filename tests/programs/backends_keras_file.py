"""A `.keras` file saved on one backend and trained on another; prints JSON.

Used by tests/test_backends.py, with KERAS_BACKEND set for each step:

    python backends_keras_file.py save PATH   # trains 2 epochs, saves, and
                                              # continues 1 epoch
    python backends_keras_file.py load PATH   # loads, continues 1 epoch
                                              # (and the controls below)
"""

import json
import sys

import keras
import numpy as np

import keras_clip as kc

EPSILON = 2.0**-12  # the relative perturbation that measures amplification


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype("float32")
    y = (np.stack([x.sum(1), 3 * x[:, 0]], axis=1) * 5).astype("float32")
    return x, y


def new_optimizer():
    # Four warm-up steps, then ZClip clips from its mean and variance.
    return kc.ClippedAdam(0.01, clipper=kc.ZClip(warmup_steps=4, z_thresh=0.5))


def fit(model, epochs):
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def state(model):
    return {
        "weights": [np.asarray(w, "float64").tolist() for w in model.get_weights()],
        "optimizer": [
            [v.name, np.asarray(keras.ops.convert_to_numpy(v.value)).tolist()]
            for v in model.optimizer.variables
        ],
        "stats": model.optimizer.gradient_stats(),
    }


def save(path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dense(2, name="head"),
    ])
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit(model, 2)
    model.save(path)
    saved = state(model)
    fit(model, 1)
    return {"saved": saved, "continued": state(model)}


def load(path):
    loaded = keras.saving.load_model(path)
    out = {"loaded": state(loaded)}
    fit(loaded, 1)
    out["continued"] = state(loaded)

    # Amplification: the continuation from the loaded state with every float
    # weight and optimizer variable perturbed by EPSILON relative (random
    # signs); the relative change of the weights over EPSILON (a finite
    # difference, in the linear regime: EPSILON is 2**12 times u).
    perturbed = keras.saving.load_model(path)
    rng = np.random.default_rng(3)
    for v in [*perturbed.weights, *perturbed.optimizer.variables]:
        value = np.asarray(keras.ops.convert_to_numpy(v.value))
        if value.dtype == np.float32 and v.name not in ("learning_rate", "clip_max_norm"):
            v.assign(value * (1 + EPSILON * rng.choice([-1.0, 1.0], value.shape)))
    fit(perturbed, 1)
    out["amplification"] = max(
        float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(b))
        for a, b in zip(perturbed.get_weights(), out["continued"]["weights"])
    ) / EPSILON

    # Controls: what the continuation would be without the optimizer's state
    # (a new optimizer), and without the clipper's state alone.
    fresh = keras.saving.load_model(path)
    fresh.compile(optimizer=new_optimizer(), loss="mse")
    fit(fresh, 1)
    out["without_optimizer_state"] = state(fresh)["weights"]
    reset = keras.saving.load_model(path)
    opt = new_optimizer()
    opt.build(reset.trainable_variables)
    initial = {v.name: v for v in opt.variables}
    for v in reset.optimizer.variables:
        if v.name.startswith("clip_"):
            v.assign(initial[v.name].value)
    fit(reset, 1)
    out["without_clipper_state"] = state(reset)["weights"]
    return out


if __name__ == "__main__":
    mode, path = sys.argv[1:3]
    out = save(path) if mode == "save" else load(path)
    out["backend"] = keras.backend.backend()
    json.dump(out, sys.stdout)
