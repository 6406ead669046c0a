"""Fits with GradientHistogramLogger where TensorFlow cannot be imported;
reads the event files back with TensorBoard's reader; prints JSON.

Used by tests/test_backends.py with KERAS_BACKEND=jax or torch:

    python backends_no_tensorflow.py LOG_DIR
"""

import sys

# Before anything imports it: `import tensorflow` now raises ImportError.
sys.modules["tensorflow"] = None

import json
import os

import keras
import numpy as np

import keras_clip as kc


class Norms(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.norms = []

    def on_train_batch_end(self, batch, logs=None):
        self.norms.append(self.model.optimizer.gradient_stats()["grad_norm"])


def main():
    log_dir = sys.argv[1]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dense(2, name="head"),
    ])
    model.compile(optimizer=kc.ClippedAdam(0.01, clipper="zclip"), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype("float32")
    y = (x[:, :2] * 5).astype("float32")
    norms = Norms()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[kc.GradientHistogramLogger(log_dir, freq=2), norms])

    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "train"), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = {}
    for tag in acc.Tags()["tensors"]:
        tags[tag] = {
            "plugin": acc.SummaryMetadata(tag).plugin_data.plugin_name,
            "points": [
                [e.step, tensor_util.make_ndarray(e.tensor_proto).tolist()]
                for e in sorted(acc.Tensors(tag), key=lambda e: e.step)
            ],
        }
    try:
        import tensorflow  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    layers = {
        layer.kernel.path.rsplit("/", 1)[0]: sum(
            int(np.prod(w.shape)) for w in layer.trainable_weights
        )
        for layer in model.layers
    }
    json.dump({
        "backend": keras.backend.backend(),
        "tensorflow_importable": importable,
        "tensorflow_module": repr(sys.modules.get("tensorflow")),
        "tags": tags,
        "layers": layers,
        "norms": norms.norms,
    }, sys.stdout)


if __name__ == "__main__":
    main()
