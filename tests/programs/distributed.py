"""Runs a few training steps under a tf.distribute strategy; prints JSON.

Used by tests/test_distributed.py in a subprocess: TensorFlow must split the
CPU into logical devices before it starts, which the test process can't do.

    python distributed.py mirrored|one|worker INDEX PORTS... --case CASE
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

CASES = {
    # name -> the optimizer, as source (evaluated under the strategy's scope)
    "keras_global": "keras.optimizers.SGD(1.0, global_clipnorm=1.0)",
    "none": "kc.ClippedSGD(1.0)",
    "value": "kc.ClippedSGD(1.0, clipper=kc.ValueClip(0.05))",
    "norm": "kc.ClippedSGD(1.0, clipper=kc.NormClip(0.5))",
    "global_norm": "kc.ClippedSGD(1.0, clipper=kc.GlobalNormClip(1.0))",
    "agc": "kc.ClippedSGD(1.0, clipper=kc.AdaptiveGradClip(0.05))",
    "autoclip": "kc.ClippedSGD(1.0, clipper=kc.AutoClip(50.0, history_size=4))",
    "zclip": "kc.ClippedSGD(1.0, clipper=kc.ZClip(warmup_steps=1, z_thresh=0.5))",
    "adagc": "kc.ClippedSGD(1.0, clipper=kc.AdaGC(warmup_steps=1, relative_factor=1.05))",
    "adam_decay": "kc.ClippedAdamW(0.1, weight_decay=0.1, global_clipnorm=1.0)",
    "nan_skip": "kc.ClippedAdam(0.1, global_clipnorm=1.0)",
}


def custom_loop(strategy, model, x, y, after_step):
    """One epoch of batches of 16 with `strategy.run`.

    Keras 3.15's `fit` fails under `MultiWorkerMirroredStrategy` before the
    first step, even with plain SGD (`_maybe_symbolic_build` reduces the first
    batch eagerly): not ours to fix, so the workers train with the loop every
    custom-training guide shows.
    """
    import keras

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)
    replicas = strategy.num_replicas_in_sync

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                error = keras.ops.mean(keras.ops.square(model(xb) - yb))
                loss = error / replicas  # the global-batch mean, in parts
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(xb, yb))

    for xb, yb in strategy.experimental_distribute_dataset(data):
        step(xb, yb)
        after_step()


def new_model(dtype):
    import keras

    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh", dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


U32 = 2.0**-24  # float32's unit roundoff


def amplification(case, start, weights, optimizer, x, y):
    """How much the run magnifies a relative error of float32's unit roundoff.

    The run again in float64 from weights perturbed by `u` relative (random
    signs): the relative change of the final weights, divided by `u`.
    """
    import keras

    rng = np.random.default_rng(2)
    model = new_model("float64")
    model.set_weights([w * (1 + U32 * rng.choice([-1.0, 1.0], w.shape)) for w in start])
    model.compile(optimizer=optimizer(), loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return max(
        float(np.linalg.norm(a - b) / np.linalg.norm(b))
        for a, b in zip(model.get_weights(), weights)
    ) / U32


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=["mirrored", "one", "worker"])
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--ports", type=int, nargs="*", default=[])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()

    if args.strategy == "worker":
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in args.ports]},
            "task": {"type": "worker", "index": args.index},
        })
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        if args.strategy == "mirrored":
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        else:
            strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    import keras
    import keras_clip as kc  # noqa: F401

    keras.config.set_floatx(args.dtype)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16 * args.steps, 5)).astype("float32")
    y = (x @ rng.standard_normal((5, 2)) * 10).astype("float32")
    x, y = x.astype(args.dtype), y.astype(args.dtype)
    out = {"replicas": strategy.num_replicas_in_sync}
    for case in args.cases:
        keras.utils.set_random_seed(1)
        xc, yc = x.copy(), y.copy()
        if case == "nan_skip":
            xc[16 + 3, 0] = np.nan  # one sample of step 2, on one replica
        # The same initial weights in float32 and float64.
        start = [w.astype(args.dtype) for w in new_model("float32").get_weights()]
        with strategy.scope():
            model = new_model(args.dtype)
            model.set_weights(start)
            model.compile(optimizer=eval(CASES[case]), loss="mse", jit_compile=False)
        initial = [w.copy() for w in model.get_weights()]
        deltas = []

        def record(*_, **__):
            now = model.get_weights()
            deltas.append(float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(now, initial)))))

        if args.strategy == "worker":
            custom_loop(strategy, model, xc, yc, record)
        else:
            callback = keras.callbacks.LambdaCallback(on_train_batch_end=record)
            model.fit(xc, yc, batch_size=16, epochs=1, shuffle=False, verbose=0,
                      callbacks=[callback])
        weights = model.get_weights()
        result = {"weights": [w.tolist() for w in weights], "first_delta": deltas[0]}
        if args.dtype == "float64":
            result["amplification"] = amplification(
                case, start, weights, lambda: eval(CASES[case], {"keras": keras, "kc": kc}), xc, yc
            )
        opt = model.optimizer
        if hasattr(opt, "gradient_stats"):
            result["stats"] = opt.gradient_stats()
            # Every replica holds the same weights.
            result["replicas_agree"] = all(
                all(np.array_equal(strategy.experimental_local_results(v.value)[0].numpy(),
                                   r.numpy()) for r in strategy.experimental_local_results(v.value))
                for v in model.weights
            )
        out[case] = result
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
