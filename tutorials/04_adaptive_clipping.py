"""
Title: Adaptive clipping: AGC, ZClip and AutoClip
Author: keras-clip
Date created: 2026/11/27
Last modified: 2026/11/27
Description: Thresholds that adapt: AGC on a CNN without batch normalization at a
    large learning rate, and ZClip and AutoClip on a run with loss spikes, each
    against fixed global-norm thresholds.
"""

"""
## Introduction

A fixed threshold `GlobalNormClip(c)` asks you for one number, `c`, and holds it for
the whole run and for every layer. Two things make that number hard to choose:

- **Layers differ.** What a step does to a layer depends on the size of the step
  *relative to the layer's weights*: a gradient of norm 0.5 is a nudge for a kernel of
  norm 10, and a rewrite for one of norm 0.5. Adaptive Gradient Clipping (AGC,
  [Brock et al., 2021](https://arxiv.org/abs/2102.06171)) clips each unit's gradient
  to a fraction of that unit's weight norm.
- **Time differs.** Gradient norms drift as training goes on. ZClip
  ([Kumar et al., 2025](https://arxiv.org/abs/2504.02507)) keeps a running mean and
  variance of the norm and clips only norms that stand out from it (a z-score
  above 2.5); AutoClip ([Seetharaman et al., 2020](https://arxiv.org/abs/2007.14469))
  clips to a low percentile (the 10th, by default) of all the norms seen so far.

Part 1 trains a small CNN without batch normalization with SGD at a large learning
rate, with and without AGC. Part 2 trains a regression network on data with a few
corrupted batches (loss spikes), with ZClip, AutoClip and fixed thresholds.

The figures (PNG) go to the folder `KERAS_CLIP_OUT` (default:
`tutorials/output/04_adaptive_clipping`). Set `KERAS_CLIP_FAST=1` for a quick run with
fewer epochs.
"""

"""
## Setup
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")  # write files, never open a window
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import keras
import tensorflow as tf

import keras_clip as kc

FAST = os.environ.get("KERAS_CLIP_FAST", "0") not in ("", "0")
OUT = os.environ.get("KERAS_CLIP_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "output", "04_adaptive_clipping"
)
os.makedirs(OUT, exist_ok=True)

SEED = 0
CNN_EPOCHS = 2 if FAST else 6
SPIKE_EPOCHS = 5 if FAST else 10


def save(fig, name):
    """Writes `fig` to the output folder and prints its path."""
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


"""
## Part 1: AGC on a CNN without batch normalization

The data: 16x16 grayscale images of noise (standard deviation 0.3) with one bright
bar of length 7 at a random place; the class is the bar's orientation: horizontal,
vertical, diagonal or anti-diagonal. 4096 images to train on, 1024 to validate.
"""


def make_images(n, rng):
    x = rng.normal(0.0, 0.3, (n, 16, 16, 1)).astype("float32")
    labels = rng.integers(0, 4, n)
    centers = rng.integers(3, 13, (n, 2))
    offsets = np.arange(-3, 4)
    for i, (label, (r, c)) in enumerate(zip(labels, centers)):
        rows = {0: r + 0 * offsets, 1: r + offsets, 2: r + offsets, 3: r + offsets}[
            label
        ]
        cols = {0: c + offsets, 1: c + 0 * offsets, 2: c + offsets, 3: c - offsets}[
            label
        ]
        x[i, np.clip(rows, 0, 15), np.clip(cols, 0, 15), 0] += 1.0
    return x, labels


rng = np.random.default_rng(SEED)
x_img, y_img = make_images(4096, rng)
x_img_val, y_img_val = make_images(1024, rng)

"""
The model: three `Conv2D` layers with ReLU, global average pooling and a linear
classifier named `logits`; no batch normalization. Batch normalization rescales each
layer's inputs and so keeps every layer's step in proportion to its weights; without
it, nothing does, and a large learning rate can wreck a layer in a few steps. That is
the setting AGC was designed for (the paper's normalizer-free networks).

We train it with SGD, momentum 0.9, batches of 64, at a learning rate of 1.0, four
times from the same initial weights:

- no clipping;
- `GlobalNormClip(1.0)`;
- `AdaptiveGradClip(0.02, exclude=["logits"])`: each unit's gradient (a unit is one
  output channel, the last axis of a Keras kernel) is clipped to at most 0.02 times
  that unit's weight norm. As in the paper, the final classifier is left unclipped.
  The paper found that larger batches need a smaller `clip_factor` (0.01 at batch
  4096); at batch 64, 0.02 is our choice, not a tuned value;
- the same AGC with the biases excluded as well (`exclude=["logits", "bias"]`), to
  find out what AGC's clipping of the biases did (see below).
"""


def make_cnn():
    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(
                16, 3, padding="same", activation="relu", name="conv_1"
            ),
            keras.layers.Conv2D(
                32, 3, strides=2, padding="same", activation="relu", name="conv_2"
            ),
            keras.layers.Conv2D(
                64, 3, strides=2, padding="same", activation="relu", name="conv_3"
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="logits"),
        ]
    )


keras.utils.set_random_seed(SEED)
cnn = make_cnn()
cnn_initial = cnn.get_weights()
CNN_LR = 1.0
AGC_FACTOR = 0.02
cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

"""
A callback measures, every 16 steps, the fraction of *dead* ReLU units: channels of
the three convolutions that output 0 for every one of 256 validation images. A dead
unit gets no gradient through its own output: it can only come back if the layers
below it change what it sees. A network whose units have all died predicts the same
thing for every image.
"""

probe = keras.Model(
    cnn.inputs[0], [cnn.get_layer(f"conv_{i}").output for i in (1, 2, 3)]
)


class Diagnostics(keras.callbacks.Callback):
    """Dead units every 16 steps; validation accuracy after every epoch."""

    def on_train_begin(self, logs=None):
        self.steps, self.dead, self.accuracy = [], [], []
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % 16 == 0:
            self.model  # noqa: B018 (on JAX, reading `model` brings the weights back mid-fit)
            outputs = probe(x_img_val[:256])
            alive = [np.asarray(o).max(axis=(0, 1, 2)) > 0 for o in outputs]
            self.steps.append(self.step)
            self.dead.append(1.0 - float(np.mean(np.concatenate(alive))))

    def on_epoch_end(self, epoch, logs=None):
        logits = self.model.predict(x_img_val, verbose=0, batch_size=256)
        self.accuracy.append(float(np.mean(np.argmax(logits, axis=1) == y_img_val)))


AGC_NAME = f"AGC({AGC_FACTOR})"
AGC_NO_BIAS = f"AGC({AGC_FACTOR}), biases excluded"
cnn_runs = {
    "no clipping": None,
    "GlobalNormClip(1.0)": kc.GlobalNormClip(1.0),
    AGC_NAME: kc.AdaptiveGradClip(AGC_FACTOR, exclude=["logits"]),
    AGC_NO_BIAS: kc.AdaptiveGradClip(AGC_FACTOR, exclude=["logits", "bias"]),
}
cnn_results = {}
for name, clipper in cnn_runs.items():
    cnn.set_weights(cnn_initial)
    keras.utils.set_random_seed(SEED)
    optimizer = kc.ClippedSGD(CNN_LR, momentum=0.9, clipper=clipper)
    cnn.compile(optimizer=optimizer, loss=cross_entropy)
    diagnostics = Diagnostics()
    cnn.fit(
        x_img,
        y_img,
        batch_size=64,
        epochs=CNN_EPOCHS,
        verbose=0,
        callbacks=[diagnostics],
    )
    biases = [np.asarray(cnn.get_layer(f"conv_{i}").bias) for i in (1, 2, 3)]
    cnn_results[name] = {
        "accuracy": diagnostics.accuracy,
        "steps": diagnostics.steps,
        "dead": diagnostics.dead,
        "clip_rate": optimizer.gradient_stats()["clip_rate"],
        "mean_bias": float(np.mean(np.concatenate(biases))),
    }

print(
    f"{'run':32s} {'val. accuracy by epoch':>26s} {'clip rate':>9s} "
    f"{'dead units':>10s} {'mean conv bias':>14s}"
)
for name, r in cnn_results.items():
    accuracy = " ".join(f"{a:.2f}" for a in r["accuracy"])
    print(
        f"{name:32s} {accuracy:>26s} {r['clip_rate']:9.0%} {r['dead'][-1]:10.0%} "
        f"{r['mean_bias']:14.3g}"
    )

fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
colors = {
    "no clipping": "black",
    "GlobalNormClip(1.0)": "tab:green",
    AGC_NAME: "tab:red",
    AGC_NO_BIAS: "tab:orange",
}
for name, r in cnn_results.items():
    epochs = np.arange(1, len(r["accuracy"]) + 1)
    left.plot(
        epochs,
        r["accuracy"],
        "o-",
        color=colors[name],
        label=f"{name} (clip rate {r['clip_rate']:.0%})",
    )
    right.plot(r["steps"], r["dead"], "-", color=colors[name], label=name)
left.axhline(0.25, color="gray", ls=":", label="chance")
left.set(
    xlabel="epoch",
    ylabel="validation accuracy",
    ylim=(0, 1.05),
    title=f"SGD, momentum 0.9, learning rate {CNN_LR}, no batch norm",
)
left.xaxis.set_major_locator(MaxNLocator(integer=True))
left.legend(fontsize=8)
right.set(
    xlabel="step",
    ylabel="fraction of conv units",
    ylim=(-0.02, 1.02),
    title="Dead ReLU units (zero on all 256 validation images)",
)
right.legend(fontsize=8)
save(fig, "04_agc.png")

"""
What the run shows, read by the script rather than asserted:
"""

for name, r in cnn_results.items():
    first_good = next((i + 1 for i, a in enumerate(r["accuracy"]) if a >= 0.9), None)
    reached = (
        f"reached 90% validation accuracy in epoch {first_good}"
        if first_good
        else "never reached 90% validation accuracy"
    )
    print(f"{name:32s} {reached}; most dead units at any check: {max(r['dead']):.0%}")
with_bias, without_bias = cnn_results[AGC_NAME], cnn_results[AGC_NO_BIAS]
if max(without_bias["dead"]) > max(with_bias["dead"]) + 0.2:
    print(
        "Excluding the biases from AGC let units die that AGC kept alive: in this run, "
        "what AGC did to the biases made the difference."
    )
else:
    print(
        "Excluding the biases from AGC did not let many more units die in this run: "
        "the biases were not what made the difference here."
    )

"""
Why the biases? AGC's bound for a unit is `clip_factor * max(||W_i||, epsilon)`. A
bias vector counts as one unit (keras-clip's convention for vectors), and Keras
initializes biases at zero, so at the start a bias's bound is
`0.02 * 1e-3 = 2e-5`: AGC holds the biases almost still at first, and afterwards
lets each bias vector change only in proportion to its own norm. Without that limit,
SGD at this learning rate is free to push the biases down, where a ReLU outputs zero
for every input: compare the mean convolution bias at the end of each run, in the
table. The right panel shows how many units died in the runs without that limit,
and whether they came back later (a dead unit can come back when the layers below it
change what it sees); the last run tells whether the biases were the reason (the
line printed above).

`GlobalNormClip` sees one number for the whole model, the global norm, and knows
nothing about the weights: its clip rate tells how often that number exceeded 1.0
here, which is how often it acted at all.

Compare AGC's clip rate (the steps on which it clipped at least one unit) with the
others': AGC is not a spike catcher but a permanent limit on how fast each unit may
change relative to its own size, which is how it stands in for what batch
normalization did. This is one run, on one seed and one learning rate;
the paper reports AGC over large sweeps of batch sizes and learning rates.

## Part 2: ZClip and AutoClip on a run with loss spikes

The data: 16 features, a target `tanh(x . w / 2)` plus noise of standard deviation
0.1, 2048 rows; a network of two `Dense(64, relu)` layers trained with Adam (learning
rate 1e-3), batches of 32, for several epochs. We lay the epochs out in a fixed order
ourselves, so that we know where each batch is, and corrupt four batches spread over
the run: their targets are multiplied by 30 (a unit mix-up, say). Each of those
batches is a loss spike, and its gradient is far larger than the usual one (the script
prints both).

Five runs from the same initial weights, on the same batches:

- no clipping;
- `GlobalNormClip(1.0)`, a threshold near the typical norm of the first steps;
- `GlobalNormClip(10.0)`, a threshold that looks safe: ten times that;
- `ZClip()`, with its defaults (`alpha=0.97`, `z_thresh=2.5`, 25 warm-up steps);
- `AutoClip()`, with its defaults (the 10th percentile of the last 1000 norms).

A callback records every step's global norm (before clipping) and the threshold the
clipper used on that step (`gradient_stats()["clip_threshold"]`), and measures the
loss on clean validation data every 16 steps.
"""

FEATURES = 16
BATCH = 32
w_true = rng.standard_normal((FEATURES, 1))


def make_regression(n):
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = np.tanh(x @ w_true / 2) + 0.1 * rng.standard_normal((n, 1))
    return x, y.astype("float32")


x_reg, y_reg = make_regression(2048)
x_reg_val, y_reg_val = make_regression(1024)
order = np.concatenate(
    [
        np.random.default_rng(epoch).permutation(len(x_reg))
        for epoch in range(SPIKE_EPOCHS)
    ]
)
x_run, y_run = x_reg[order], y_reg[order].copy()
steps = len(x_run) // BATCH
spike_steps = [int(steps * f) for f in (0.2, 0.4, 0.6, 0.8)]  # 0-based
for s in spike_steps:
    y_run[s * BATCH : (s + 1) * BATCH] *= 30.0
print(f"{steps} steps; corrupted batches at steps {[s + 1 for s in spike_steps]}")


class StepLog(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.norm, self.threshold, self.val_steps, self.val_loss = [], [], [], []

    def on_train_batch_end(self, batch, logs=None):
        stats = self.model.optimizer.gradient_stats()
        self.norm.append(stats["grad_norm"])
        self.threshold.append(stats["clip_threshold"])
        if (batch + 1) % 16 == 0:
            prediction = self.model(x_reg_val)
            self.val_steps.append(batch + 1)
            self.val_loss.append(
                float(np.mean((np.asarray(prediction) - y_reg_val) ** 2))
            )


keras.utils.set_random_seed(SEED)
mlp = keras.Sequential(
    [
        keras.Input((FEATURES,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1),
    ]
)
mlp_initial = mlp.get_weights()
spike_runs = {
    "no clipping": None,
    "GlobalNormClip(1.0)": kc.GlobalNormClip(1.0),
    "GlobalNormClip(10.0)": kc.GlobalNormClip(10.0),
    "ZClip()": kc.ZClip(),
    "AutoClip()": kc.AutoClip(),
}
spike_results = {}
for name, clipper in spike_runs.items():
    mlp.set_weights(mlp_initial)
    keras.utils.set_random_seed(SEED)
    optimizer = kc.ClippedAdam(1e-3, clipper=clipper)
    mlp.compile(optimizer=optimizer, loss="mse")
    log = StepLog()
    mlp.fit(
        x_run,
        y_run,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[log],
    )
    norm, threshold = np.array(log.norm), np.array(log.threshold)
    clipped = norm > threshold
    spike_results[name] = {
        "norm": norm,
        "threshold": threshold,
        "val_steps": np.array(log.val_steps),
        "val_loss": np.array(log.val_loss),
        "clip_rate": optimizer.gradient_stats()["clip_rate"],
        "spikes_clipped": int(sum(clipped[s] for s in spike_steps)),
        "other_clipped": float(np.mean(np.delete(clipped, spike_steps))),
    }

"""
## What the clippers did
"""

print(
    f"\n{'run':21s} {'clip rate':>9s} {'spikes clipped':>15s} {'other steps clipped':>20s} "
    f"{'final val loss':>15s} {'worst val loss after the first spike':>37s}"
)
for name, r in spike_results.items():
    late = r["val_loss"][r["val_steps"] > spike_steps[0]]
    print(
        f"{name:21s} {r['clip_rate']:9.1%} {r['spikes_clipped']:>12d} / 4 "
        f"{r['other_clipped']:20.1%} {r['val_loss'][-1]:15.4g} {late.max():37.4g}"
    )
zclip_norm = spike_results["ZClip()"]["norm"]
typical_early = np.median(zclip_norm[:50])
typical_late = np.median(zclip_norm[-50:])
print(
    f"\ntypical norm (median) in ZClip's run, first 50 steps: {typical_early:.3g}; "
    f"last 50: {typical_late:.3g} ({typical_early / typical_late:.2g} times smaller "
    f"at the end); the spikes: "
    + ", ".join(f"{zclip_norm[s]:.3g}" for s in spike_steps)
)
best = min(spike_results, key=lambda n: spike_results[n]["val_loss"][-1])
print(f"lowest final validation loss: {best}")

fig, axes = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
colors = {
    "no clipping": "black",
    "GlobalNormClip(1.0)": "tab:green",
    "GlobalNormClip(10.0)": "tab:olive",
    "ZClip()": "tab:red",
    "AutoClip()": "tab:blue",
}
step_axis = np.arange(1, steps + 1)
zclip = spike_results["ZClip()"]
axes[0].plot(
    step_axis,
    zclip["norm"],
    color="darkgray",
    lw=0.8,
    label="global norm (ZClip's run)",
)
for name in ["GlobalNormClip(1.0)", "GlobalNormClip(10.0)", "AutoClip()"]:
    axes[0].plot(
        step_axis,
        spike_results[name]["threshold"],
        color=colors[name],
        lw=1.5,
        label=f"threshold: {name}",
    )
zclip_clipped = zclip["norm"] > zclip["threshold"]
axes[0].plot(
    step_axis[zclip_clipped],
    zclip["threshold"][zclip_clipped],
    "v",
    color=colors["ZClip()"],
    ms=5,
    label="ZClip(): clipped to",
)
for s in spike_steps:
    for ax in axes:
        ax.axvline(s + 1, color="gray", ls=":", lw=1)
axes[0].set(
    yscale="log",
    ylabel="norm / threshold",
    title="Thresholds, step by step (dotted: the corrupted batches)",
)
axes[0].legend(fontsize=8, ncol=2, loc="upper right")
for name, r in spike_results.items():
    axes[1].plot(
        r["val_steps"], r["val_loss"], "o-", ms=3, color=colors[name], label=name
    )
axes[1].set(
    yscale="log",
    xlabel="step",
    ylabel="validation MSE (clean data)",
    title="Validation loss, every 16 steps",
)
axes[1].legend(fontsize=8, ncol=2)
save(fig, "04_spikes.png")

"""
How to read the table and the figure:

- The **thresholds**: a fixed threshold is a flat line; AutoClip's follows the 10th
  percentile of the norms seen so far, so it sits *below* most norms and clips most
  steps. ZClip has no threshold on a step it leaves alone (its statistics report the
  norm itself there), so the figure marks only the steps it clipped, at the value it
  clipped them to: its running mean of the norm plus a margin.
- **spikes clipped**: a threshold below a spike's norm cuts it down. Any threshold in
  the right range catches spikes as large as these; the question is how far it lets
  the spike's step go (up to the threshold).
- **other steps clipped**: ZClip clips only what stands out from its running
  statistics, so outside the spikes it clips few steps. AutoClip, by design, clips
  most of them (every norm above the 10th percentile of the history). With Adam,
  which divides each step by its own running average of gradient sizes, a clipping
  scale that changes slowly mostly cancels out, and a spike is cut to the size of the
  steps around it; with SGD, the same clip rate would act as a smaller learning rate.
  The validation columns show what it cost or gained here.
- The **validation loss** after each corrupted batch shows what a spike did to the
  model: compare the runs' worst values after the first spike and their final values
  in the table.

The printed typical norms show how far the norm drifted over this run (in a run
that the spikes did not disturb). The further it drifts, the more a fixed threshold
is a guess: one that was "a bit above typical" at the start ends up far above, or
below, the typical norm later. The adaptive clippers take that
choice off your hands; their own parameters (`z_thresh`, `percentile`) are relative,
and their defaults are the papers'. Their state (ZClip's mean and variance, AutoClip's
history) lives in the optimizer's variables, so it is saved with the model and resumes
exactly (`tests/test_adaptive.py` checks that; this script does not).
"""
