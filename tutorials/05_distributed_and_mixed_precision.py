"""
Title: Clipping under MirroredStrategy and mixed precision
Author: keras-clip
Date created: 2026/11/27
Last modified: 2026/11/27
Description: Where a clipping threshold is applied decides what it means: Keras's
    own global_clipnorm under tf.distribute.MirroredStrategy and mixed_float16,
    against keras-clip's, measured on two logical CPU devices.
"""

"""
## Introduction

`global_clipnorm=1.0` promises that no update is larger than the learning rate
times 1.0. With plain SGD at learning rate 1.0 that is easy to check: the first
update, the distance the weights move, must have norm 1.0 at most, whenever the
gradient's norm is larger.

The promise is about the gradient of the whole batch. Two common setups split or
scale that gradient before the optimizer sees it:

- **`tf.distribute.MirroredStrategy`** splits each batch between replicas; each
  computes the gradient of its part, and the parts are summed (all-reduced).
  Clipping must come *after* the sum.
- **Mixed precision** (`mixed_float16`) multiplies the loss by a large *loss scale*
  so that small float16 gradients do not underflow; Keras wraps the optimizer in a
  `LossScaleOptimizer`, which divides the gradients by the scale again and skips steps
  whose float16 gradients overflowed. Clipping must come *after* that.

This tutorial measures both, with Keras's `SGD(1.0, global_clipnorm=1.0)` and
keras-clip's `ClippedSGD(1.0, global_clipnorm=1.0)`, on one device and on two logical
CPU devices: no GPU needed.

It writes its figure (PNG) to the folder `KERAS_CLIP_OUT` (default:
`tutorials/output/05_distributed_and_mixed_precision`) and prints its path. Set
`KERAS_CLIP_FAST=1` for fewer steps.

## Setup: two logical devices, before TensorFlow starts

TensorFlow fixes its devices the first time it uses them, so the split of the CPU
into two logical devices has to come first, before Keras or anything else touches
TensorFlow. That is why this script imports TensorFlow and configures the devices
before it imports Keras and keras-clip; in your own script, do the same at the very
top (in a notebook: in the first cell, then restart the kernel if TensorFlow had
already started).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu,
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)
print("logical devices:", [d.name for d in tf.config.list_logical_devices("CPU")])

import matplotlib

matplotlib.use("Agg")  # write files, never open a window
import matplotlib.pyplot as plt
import numpy as np
import keras

import keras_clip as kc

FAST = os.environ.get("KERAS_CLIP_FAST", "0") not in ("", "0")
OUT = os.environ.get("KERAS_CLIP_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "output",
    "05_distributed_and_mixed_precision",
)
os.makedirs(OUT, exist_ok=True)

STEPS = 8 if FAST else 16
BATCH = 16  # the global batch: 8 rows per replica under MirroredStrategy


def save(fig, name):
    """Writes `fig` to the output folder and prints its path."""
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


"""
## Data, model and the measurement

A linear regression target times 10, so that the gradients are large (a norm of
tens) and every step is clipped; a small network, `Dense(4, tanh)` then `Dense(2)`,
always built from the same initial weights. Each run is one epoch of `STEPS` batches
of 16, in order (`shuffle=False`), so every run sees the same batches.

A callback measures the norm of every update: the distance between the weights
before and after the step. With SGD at learning rate 1.0 and a clipped gradient, it
should be exactly 1.0 (or 0 for a step that was skipped).
"""

rng = np.random.default_rng(0)
w_true = rng.standard_normal((5, 2))
x = rng.standard_normal((BATCH * STEPS, 5)).astype("float32")
y = (x @ w_true * 10).astype("float32")


def new_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )


initial_weights = new_model().get_weights()
one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(f"MirroredStrategy with {mirrored.num_replicas_in_sync} replicas")


class UpdateNorms(keras.callbacks.Callback):
    """After each step: the update's norm, the loss scale, keras-clip's statistics."""

    def on_train_begin(self, logs=None):
        self.updates, self.loss_scale, self.grad_norm, self.nonfinite = [], [], [], []
        self._before = self.model.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        after = self.model.get_weights()
        self.updates.append(
            float(
                np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, self._before)))
            )
        )
        self._before = after
        optimizer = self.model.optimizer
        scale = getattr(optimizer, "dynamic_scale", None)
        self.loss_scale.append(None if scale is None else float(np.asarray(scale)))
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(inner, kc.ClippingMixin):
            stats = optimizer.gradient_stats()  # reaches through a LossScaleOptimizer
            self.grad_norm.append(stats["grad_norm"])
            self.nonfinite.append(stats["nonfinite_steps"])


def run(make_optimizer, strategy, policy="float32"):
    """One epoch from the initial weights; returns what the callback measured."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        with strategy.scope():
            model = new_model()
            model.set_weights(initial_weights)
            model.compile(optimizer=make_optimizer(), loss="mse")
        record = UpdateNorms()
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[record],
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", None)
    return {
        "optimizer": type(optimizer).__name__
        + ("" if inner is None else f"({type(inner).__name__})"),
        "updates": np.array(record.updates),
        "loss_scale": record.loss_scale,
        "grad_norm": np.array(record.grad_norm),
        "nonfinite": record.nonfinite,
        "weights": model.get_weights(),
    }


OPTIMIZERS = {
    "Keras SGD(1.0, global_clipnorm=1.0)": lambda: keras.optimizers.SGD(
        1.0, global_clipnorm=1.0
    ),
    "keras-clip ClippedSGD(1.0, global_clipnorm=1.0)": lambda: kc.ClippedSGD(
        1.0, global_clipnorm=1.0
    ),
}
STRATEGIES = {"one device": one_device, "MirroredStrategy, 2 replicas": mirrored}

"""
## Part 1: MirroredStrategy, float32

Four runs: each optimizer on one device and on two replicas.
"""

part1 = {}
for opt_name, make_optimizer in OPTIMIZERS.items():
    for strategy_name, strategy in STRATEGIES.items():
        part1[opt_name, strategy_name] = run(make_optimizer, strategy)


def describe(updates):
    finite = updates[np.isfinite(updates)]
    return (
        f"first update {updates[0]:.4f}; all {len(updates)} updates between "
        f"{finite.min():.4f} and {finite.max():.4f}"
        + ("" if len(finite) == len(updates) else f"; {len(updates) - len(finite)} NaN")
    )


for (opt_name, strategy_name), r in part1.items():
    print(f"{opt_name:48s} {strategy_name:30s} {describe(r['updates'])}")

for opt_name in OPTIMIZERS:
    a = part1[opt_name, "one device"]["weights"]
    b = part1[opt_name, "MirroredStrategy, 2 replicas"]["weights"]
    gap = max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
    print(
        f"{opt_name}: largest weight difference, 2 replicas vs one device, after "
        f"{STEPS} steps: {gap:.2g}"
    )

"""
On one device, both optimizers move the weights by exactly 1.0 per step. Under
`MirroredStrategy`, Keras's own `global_clipnorm` does not: Keras 3.15 on TensorFlow
calls the optimizer in each replica with that replica's part of the gradient (its half
of the batch, already divided by the number of replicas so that the parts add up to
the batch's gradient), and the optimizer clips each part to norm 1.0 *before* the
all-reduce adds them. Two parts of norm 1.0 add up to an update of norm up to 2.0;
how close to 2.0 depends on how aligned the two halves' gradients are (the printed
range). The threshold you set is silently a different one.

keras-clip sums the parts across replicas first and clips the sum, so every replica
applies the same clipped gradient, the one a single device would have computed: the
largest weight difference from the one-device run printed above is float32 rounding
(the sums are taken in another order), where Keras's own run has drifted away.

## Part 2: mixed precision

`keras.mixed_precision.set_global_policy("mixed_float16")` makes the layers compute in
float16 (their weights stay float32), and `compile` wraps the optimizer in a
`LossScaleOptimizer`. Its loss scale starts at 2**15 = 32768: the float16 gradients of
the scaled loss overflow at first, and each step that overflows is skipped while the
scale is halved, until it fits. We run the same four cases under this policy.

What to look for: the update norms of the steps that were applied (0 means skipped),
the loss scale, and keras-clip's statistics, which the `LossScaleOptimizer` passes
through (`model.optimizer.gradient_stats()`).
"""

part2 = {}
for opt_name, make_optimizer in OPTIMIZERS.items():
    for strategy_name, strategy in STRATEGIES.items():
        part2[opt_name, strategy_name] = run(make_optimizer, strategy, "mixed_float16")

for (opt_name, strategy_name), r in part2.items():
    updates = ", ".join(f"{u:.3g}" for u in r["updates"])
    scales = ", ".join(f"{s:.0f}" for s in r["loss_scale"])
    print(f"{opt_name} | {strategy_name} | {r['optimizer']}")
    print(f"    update norms: {updates}")
    print(f"    loss scale after each step: {scales}")
    if r["nonfinite"]:
        print(
            f"    keras-clip's count of non-finite steps it skipped: {r['nonfinite'][-1]}"
        )
    applied = r["updates"][np.isfinite(r["updates"]) & (r["updates"] > 0)]
    if len(applied):
        print(
            f"    applied steps: {len(applied)}, their norms from {applied.min():.4f} "
            f"to {applied.max():.4f}"
        )
    print(
        f"    weights finite at the end: "
        f"{all(np.isfinite(w).all() for w in r['weights'])}"
    )
    scale_before = [2.0**15] + r["loss_scale"][:-1]
    for step, u in enumerate(r["updates"]):
        scale_kept = r["loss_scale"][step] == scale_before[step]
        if not np.isfinite(u) and scale_kept:
            print(
                f"    step {step + 1}: the LossScaleOptimizer applied a non-finite "
                f"gradient (its loss scale stayed at {scale_before[step]:.0f})"
            )
            break
        skipped_by_kc = r["nonfinite"] and r["nonfinite"][step] > (
            r["nonfinite"][step - 1] if step else 0
        )
        if skipped_by_kc and scale_kept:
            print(
                f"    step {step + 1}: keras-clip skipped a non-finite gradient that the "
                f"LossScaleOptimizer let through (its loss scale stayed at "
                f"{scale_before[step]:.0f})"
            )

"""
keras-clip's clipper sees the *unscaled* gradient: the `LossScaleOptimizer` divides by
the scale before it calls the inner optimizer. Its statistics show it: on the first
step that was applied, the global norm keras-clip recorded under `mixed_float16` is
compared below with the float32 gradient of the same batch at the same weights. Had
the clipper seen the scaled gradient, the ratio would be the loss scale, thousands.
"""

kc_name = "keras-clip ClippedSGD(1.0, global_clipnorm=1.0)"
f32 = part1[kc_name, "one device"]
f16 = part2[kc_name, "one device"]
first_applied = int(np.argmax(f16["updates"] > 0))
# The two runs' weights differ from the first applied step on (float32 applied every
# step, mixed precision skipped the first ones), so compare that step's norm with the
# float32 run's norm on the same batch, from the same weights: the first step's.
print(
    f"first applied step under mixed_float16: step {first_applied + 1}, its recorded "
    f"gradient norm {f16['grad_norm'][first_applied]:.4g}; the loss scale was "
    f"{f16['loss_scale'][first_applied]:.0f}"
)
with one_device.scope():
    reference = new_model()
    reference.set_weights(initial_weights)
batch = slice(first_applied * BATCH, (first_applied + 1) * BATCH)
with tf.GradientTape() as tape:
    loss = keras.ops.mean(keras.ops.square(reference(x[batch]) - y[batch]))
reference_norm = float(
    kc.ops.global_norm(tape.gradient(loss, reference.trainable_variables))
)
print(
    f"float32 gradient norm of the same batch at the same (initial) weights: "
    f"{reference_norm:.4g}; ratio {f16['grad_norm'][first_applied] / reference_norm:.4f}"
)

"""
## What went wrong where

The script reads each run's outcome:
"""

for policy, results in [("float32", part1), ("mixed_float16", part2)]:
    for (opt_name, strategy_name), r in results.items():
        u = r["updates"]
        applied = u[u > 0]  # NaN compares False: not counted as applied
        nan_steps = int(np.sum(~np.isfinite(u)))
        if nan_steps:
            verdict = f"the weights became NaN or Inf ({nan_steps} steps)"
        elif np.allclose(applied, 1.0, rtol=1e-4):
            verdict = "every applied update had norm 1.0, as asked"
        else:
            verdict = (
                f"applied updates had norms up to {applied.max():.3f}, "
                "not the 1.0 asked for"
            )
        print(f"{policy:14s} {strategy_name:30s} {opt_name:48s} {verdict}")

"""
Under `mixed_float16` on one device, Keras's `LossScaleOptimizer` unscales the
gradients before it calls the inner optimizer, so Keras's own clipping and keras-clip
both see the true gradient there: compare their lines above.

Under `MirroredStrategy` with mixed precision, two things can go wrong with Keras's
own optimizers, and the output above says whether they did in this run:

- the clipping of each replica's part, as in part 1;
- an overflow on one replica only. Keras's `LossScaleOptimizer` decides whether to
  skip a step from the first replica's gradients alone (its source says the
  gradients are "all-reduced across replicas" at that point; in Keras 3 they are not
  yet, the sum happens later, in the inner optimizer). If the other replica's float16
  gradient overflowed, the step is applied with an Inf in it, and the weights become
  NaN for good. keras-clip checks the *summed* gradient for NaN and Inf before it
  clips, and skips the step on every replica (the default `nonfinite="skip"`): its
  counter of skipped steps goes up while the loss scale, which only the
  `LossScaleOptimizer` lowers, stays where it was. When the loss scale did not drop
  on a step that keras-clip skipped, the overflow was on the second replica only.
"""

fig, axes = plt.subplots(1, 3, figsize=(17, 5))
styles = {  # one device: large hollow markers, dashed; two replicas: small, solid
    ("Keras SGD(1.0, global_clipnorm=1.0)", "one device"): dict(
        color="tab:gray", marker="o", ls="--", ms=9, mfc="none", lw=2.5
    ),
    ("Keras SGD(1.0, global_clipnorm=1.0)", "MirroredStrategy, 2 replicas"): dict(
        color="black", marker="o", ls="-", ms=4
    ),
    (kc_name, "one device"): dict(
        color="tab:cyan", marker="s", ls="--", ms=9, mfc="none", lw=2.5
    ),
    (kc_name, "MirroredStrategy, 2 replicas"): dict(
        color="tab:blue", marker="s", ls="-", ms=4
    ),
}
steps = np.arange(1, STEPS + 1)


def label_of(key):
    return f"{'Keras' if key[0].startswith('Keras') else 'keras-clip'}, {key[1]}"


for ax, results, title in [
    (axes[0], part1, "float32: the norm of each update"),
    (axes[1], part2, "mixed_float16: the norm of each update"),
]:
    for key, r in results.items():
        u = r["updates"]
        ax.plot(
            steps,
            np.where(np.isfinite(u), u, np.nan),
            label=label_of(key),
            **styles[key],
        )
        bad = ~np.isfinite(u)
        if bad.any():
            ax.plot(
                steps[bad],
                np.full(bad.sum(), 2.2),
                "x",
                color=styles[key]["color"],
                ms=8,
                label=f"{label_of(key)}: NaN (drawn at 2.2)",
            )
    ax.axhline(1.0, color="tab:green", ls=":", label="global_clipnorm = 1.0")
    ax.set(
        xlabel="step",
        ylabel="||weights after - weights before||",
        ylim=(-0.1, 2.4),
        title=title,
    )
for key, r in part2.items():
    axes[2].plot(steps, r["loss_scale"], label=label_of(key), **styles[key])
axes[2].set(
    xlabel="step",
    ylabel="loss scale after the step",
    title="mixed_float16: the LossScaleOptimizer's loss scale",
)
axes[2].set_yscale("log", base=2)
handles = {}
for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
        handles.setdefault(label, handle)
fig.legend(
    handles.values(),
    handles.keys(),
    loc="lower center",
    ncol=3,
    fontsize=9,
    bbox_to_anchor=(0.5, -0.12),
)
save(fig, "05_update_norms.png")

"""
## In short

- Under `MirroredStrategy`, Keras 3.15's `global_clipnorm` (and, through the same
  code path, `clipnorm` and `clipvalue`) acts on each replica's part of the gradient;
  keras-clip's `Clipped*` optimizers clip the summed gradient, which is the one you
  meant. Create the
  optimizer inside `strategy.scope()`, as usual.
- Under `mixed_float16`, keras-clip's clipper and statistics see the unscaled
  gradient; `model.optimizer.gradient_stats()` reaches through the
  `LossScaleOptimizer`.
- Steps with NaN or Inf gradients are skipped on every replica together, including
  the ones a `LossScaleOptimizer` misses when only one replica overflowed (the output
  above says whether such a step occurred in this run).
"""
