"""
Title: Watching gradients: alarms, per-layer norms and TensorBoard histograms
Author: keras-clip
Date created: 2026/11/27
Last modified: 2026/11/27
Description: What vanishing and exploding gradients look like in History, in
    GradientMonitor's alarms and in TensorBoard, and how to read them.
"""

"""
## Introduction

A loss curve tells you *that* training went wrong, rarely *why*. The gradients tell
you why, and a keras-clip optimizer already measures them inside its compiled step:
the global norm before and after clipping, how many steps were clipped or skipped,
and (on request) each variable's norm. Two callbacks read these numbers; neither
recomputes a gradient:

- `keras_clip.GradientMonitor` puts them into the progress bar, `History`, `CSVLogger`
  and `TensorBoard`, and raises alarms: `explode`, `vanish`, `nonfinite` and `stall`.
- `keras_clip.GradientHistogramLogger` writes per-layer histograms of `log10|g|` to
  TensorBoard.

Part 1 looks at *vanishing* gradients, layer by layer, in a deep sigmoid network.
Part 2 feeds a small network a batch of bad data and a few NaNs, and shows each
alarm.

The figures (PNG) and the TensorBoard logs go to the folder `KERAS_CLIP_OUT`
(default: `tutorials/output/03_watching_gradients`). Set `KERAS_CLIP_FAST=1` for a
quick run with fewer epochs.
"""

"""
## Setup
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import glob
import shutil

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
    os.path.dirname(os.path.abspath(__file__)), "output", "03_watching_gradients"
)
os.makedirs(OUT, exist_ok=True)
LOGS = os.path.join(OUT, "logs")

SEED = 0
FEATURES = 16
DEPTH = 8
EPOCHS = 3 if FAST else 10


def save(fig, name):
    """Writes `fig` to the output folder and prints its path."""
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


"""
## Part 1: vanishing gradients, layer by layer

The data: 16 standard-normal features and a smooth target,
`tanh(2 x . w / sqrt(16))` for a fixed random `w`.

Two networks of the same shape, 8 hidden `Dense(32)` layers and a linear output:
one with `sigmoid` activations (Keras's default Glorot initialization), one with
`relu` activations and He initialization, the pairing that keeps the gradient's scale
from layer to layer.

Why would the sigmoid network's gradients vanish? Backpropagation multiplies the
gradient, layer after layer on its way down, by each layer's weights and by the
derivative of its activation. The sigmoid's derivative is at most 0.25, and Glorot's
weights are not large enough to make up for it: the gradient shrinks by a roughly
constant factor per layer, and the first layers get a gradient orders of magnitude
smaller than the last. (Adam, used here, rescales each weight's step by the size of
its own gradients, which hides part of that from the step size, but not from what
the gradient can tell the first layers.)

`GradientMonitor(per_layer=True)` records each layer's gradient norm, per epoch, in
`History.history["grad_norm/<layer>"]`. `GradientHistogramLogger` writes a histogram of
`log10|g|` per layer to TensorBoard every `freq` steps; next to it,
`keras.callbacks.TensorBoard` writes the loss to the same run.
"""

rng = np.random.default_rng(SEED)
w_true = rng.standard_normal((FEATURES, 1))
x = rng.standard_normal((2048, FEATURES)).astype("float32")
y = np.tanh(2 * x @ w_true / np.sqrt(FEATURES)).astype("float32")


def deep_mlp(name, activation, initializer):
    layers = [keras.Input((FEATURES,))]
    for i in range(DEPTH):
        layers.append(
            keras.layers.Dense(
                32, activation, kernel_initializer=initializer, name=f"hidden_{i + 1}"
            )
        )
    layers.append(keras.layers.Dense(1, name="output"))
    return keras.Sequential(layers, name=name)


layer_names = [f"hidden_{i + 1}" for i in range(DEPTH)] + ["output"]
part1 = {}
for name, activation, initializer in [
    ("sigmoid_mlp", "sigmoid", "glorot_uniform"),
    ("relu_mlp", "relu", "he_normal"),
]:
    keras.utils.set_random_seed(SEED)
    model = deep_mlp(name, activation, initializer)
    model.compile(optimizer=kc.ClippedAdam(1e-3), loss="mse")
    monitor = kc.GradientMonitor(per_layer=True)
    log_dir = os.path.join(LOGS, name)
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun starts a clean run
    history = model.fit(
        x,
        y,
        batch_size=64,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            monitor,
            kc.GradientHistogramLogger(log_dir, freq=32),
            keras.callbacks.TensorBoard(log_dir),
        ],
    )
    part1[name] = {
        "history": history.history,
        "events": monitor.events,
        "log_dir": log_dir,
    }
    print(
        f"{name}: loss by epoch "
        + ", ".join(f"{v:.3g}" for v in history.history["loss"])
    )

"""
What `History` holds now: the usual `loss`, the monitor's `grad_norm`,
`grad_norm_max`, `clipped_grad_norm` and `clip_rate` (one value per epoch), and with
`per_layer=True` one `grad_norm/<layer>` entry per layer.
"""

print("History keys:", sorted(part1["sigmoid_mlp"]["history"]))
for name, run in part1.items():
    h = run["history"]
    first = [h[f"grad_norm/{layer}"][0] for layer in layer_names]
    ratio = first[-1] / first[0]
    per_layer = ratio ** (1 / DEPTH)
    print(
        f"{name}, epoch 1: output layer's gradient norm {first[-1]:.3g}, hidden_1's "
        f"{first[0]:.3g}: {ratio:.3g} times smaller at the bottom "
        f"(a factor of {per_layer:.2f} per layer)"
    )
    print(f"{name}: alarms raised: {[e.kind for e in run['events']] or 'none'}")

fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
colors = {"sigmoid_mlp": "tab:red", "relu_mlp": "tab:blue"}
for name, run in part1.items():
    h = run["history"]
    for epoch, style in [(0, "o-"), (-1, "s--")]:
        norms = [h[f"grad_norm/{layer}"][epoch] for layer in layer_names]
        label = f"{name}, epoch {1 if epoch == 0 else len(h['loss'])}"
        axes[0].plot(layer_names, norms, style, color=colors[name], label=label)
    epochs = np.arange(1, len(h["loss"]) + 1)
    axes[1].plot(epochs, h["grad_norm"], "o-", color=colors[name], label=name)
    axes[2].plot(epochs, h["loss"], "o-", color=colors[name], label=name)
axes[0].set(
    yscale="log",
    ylabel="gradient norm (epoch mean)",
    title='History["grad_norm/<layer>"]: bottom to top',
)
axes[0].tick_params(axis="x", rotation=45)
axes[1].set(
    yscale="log",
    xlabel="epoch",
    ylabel="global gradient norm",
    title='History["grad_norm"]: the whole model',
)
axes[2].axhline(y.var(), color="gray", ls=":", label="predict the mean")
axes[2].set(xlabel="epoch", ylabel="training loss (MSE)", title='History["loss"]')
for ax in axes[1:]:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
for ax in axes:
    ax.legend(fontsize=8)
save(fig, "03_layer_norms.png")

"""
Read the left panel from left (the first hidden layer) to right (the output layer).
The printed factors say how much the gradient shrinks per layer in each network.

The middle panel is the point of `per_layer=True`: the *global* norm of the sigmoid
network does not look alarming, because the layers near the output carry it. That is
also why the `vanish` alarm, which watches the global norm, stays quiet here (the
script prints the alarms each run raised): a gradient that vanishes in the lower
layers only shows up per layer, and in the histograms.

## The same thing in TensorBoard

The logs are in `<output folder>/logs`, one run per network. Open them with

```
tensorboard --logdir tutorials/output/03_watching_gradients/logs
```

(or the folder you set in `KERAS_CLIP_OUT`, followed by `/logs`) and go to
http://localhost:6006. The **Histograms** tab has one chart per layer,
`gradients/<model>/<layer>`: the distribution of `log10|g|`, one slice per logged
step. The **Scalars** tab has `gradient_stats/grad_norm` (before clipping),
`clipped_grad_norm`, `clip_rate`, the per-layer `gradient_norms/...`, and
`gradient_zero_fraction/...` and `gradient_nonfinite/...` for the entries a log axis
cannot show (exact zeros, NaN and Inf). Keras's own TensorBoard callback adds the
loss (`epoch_loss`) to the same run, and, because it comes after the monitor in the
list of callbacks, the monitor's statistics too (`epoch_grad_norm`,
`epoch_clip_rate`, ...).

Below, the script reads the event files back (with TensorFlow's record reader) and
draws the first logged step's histograms, the picture TensorBoard shows.
"""


def read_histograms(log_dir, step):
    """{layer: (bin centers, counts)} of the histograms logged at `step`."""
    histograms = {}
    for path in sorted(
        glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))
    ):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            if event.step != step:
                continue
            for value in event.summary.value:
                if value.tag.startswith("gradients/"):
                    buckets = tf.make_ndarray(value.tensor)  # rows: left, right, count
                    layer = value.tag.rsplit("/", 1)[-1]
                    centers = (buckets[:, 0] + buckets[:, 1]) / 2
                    histograms[layer] = (centers, buckets[:, 2])
    return histograms


fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
cmap = plt.get_cmap("viridis")
for ax, (name, run) in zip(axes, part1.items()):
    histograms = read_histograms(run["log_dir"], step=0)
    for i, layer in enumerate(layer_names):
        centers, counts = histograms[layer]
        ax.plot(centers, counts / counts.sum(), color=cmap(i / DEPTH), label=layer)
    ax.set(
        xlabel="log10 |g|",
        title=f"{name}: gradients at step 0, per layer",
        xlim=(-9, 1),
    )
    ax.legend(fontsize=7, ncol=2)
axes[0].set_ylabel("fraction of the layer's entries")
save(fig, "03_histograms.png")

"""
Each curve is one layer. Where the curves of a network sit side by side on the
`log10|g|` axis, its layers get gradients of the same size; where they are spread out
by decades, some layers get gradients orders of magnitude smaller than others. That
is what vanishing gradients look like in TensorBoard. Exploding gradients would show
the other way round: curves moving right, by decades, from one logged step to the
next (part 2 shows a spike in the norms).

## Part 2: the alarms

Now a small ReLU network (2 hidden layers of 32) with a ReLU output, because the
target is positive (a `softplus` of a linear function of the features). It trains
with SGD (learning rate 0.02), batches of 32, the data in a fixed order, one epoch.
The data has three kinds of defect, at known places:

- batch 41 holds four rows whose target is `-999`: a *sentinel* for "missing" that
  slipped through (a common one). Their error is hundreds of times the usual one, and
  so is the gradient: an **explode** alarm (its line prints the ratio).
- batch 71 has one NaN feature: its gradient is NaN, a **nonfinite** alarm. With the
  default `nonfinite="skip"`, the step changes nothing.
- batches 101 to 112 have a NaN feature in every row: after 10 skipped steps in a
  row, a **stall** alarm (nothing is being learned, while the logged loss may still
  look fine).

We train this twice: without clipping, and with `GlobalNormClip(5.0)`, a threshold a
few times above the typical norm (tutorial 02 is about choosing it). The monitor reads
the norm *before* clipping, so the explode alarm fires in both runs; what differs is
what the spike does to the weights. A small callback records the global norm of every
step for the figure.
"""

BATCH = 32
STEPS = 160
x2 = rng.standard_normal((STEPS * BATCH, FEATURES)).astype("float32")
y2 = np.logaddexp(0.0, 2 * x2 @ w_true / np.sqrt(FEATURES)).astype("float32")
x2_clean, y2_clean = x2.copy(), y2.copy()
y2[40 * BATCH : 40 * BATCH + 4] = -999.0  # batch 41 (step 41)
x2[70 * BATCH + 3, 0] = np.nan  # batch 71
x2[100 * BATCH : 112 * BATCH, 0] = np.nan  # batches 101 to 112


class NormRecorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.norms = []

    def on_train_batch_end(self, batch, logs=None):
        self.norms.append(self.model.optimizer.gradient_stats()["grad_norm"])


part2 = {}
for name, clipper in [
    ("no clipping", None),
    ("GlobalNormClip(5.0)", kc.GlobalNormClip(5.0)),
]:
    print(f"\n--- training with {name} ---")
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(32, "relu"),
            keras.layers.Dense(32, "relu"),
            keras.layers.Dense(1, "relu"),
        ]
    )
    model.compile(optimizer=kc.ClippedSGD(0.02, clipper=clipper), loss="mse")
    monitor = kc.GradientMonitor(stats=["grad_norm", "clip_rate", "nonfinite_steps"])
    recorder = NormRecorder()
    history = model.fit(
        x2,
        y2,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[monitor, recorder],
    )
    clean_loss = model.evaluate(x2_clean, y2_clean, verbose=0)
    zero = float(np.mean(model.predict(x2_clean, verbose=0) == 0))
    part2[name] = {
        "zero_predictions": zero,
        "events": monitor.events,
        "norms": np.array(recorder.norms),
        "history": history.history,
        "clean_loss": clean_loss,
    }

"""
Each alarm printed on a line of its own, as it happened. They are also kept in
`monitor.events`, as `GradientEvent(step, kind, value)`, for a program to act on
(`on_explode="stop"` would end training like `TerminateOnNaN` does, `"raise"` would
raise an error).
"""

print()
for name, run in part2.items():
    print(f"{name}: monitor.events =")
    for event in run["events"]:
        print(f"    {event}")
    h = run["history"]
    print(
        f"  epoch: loss {h['loss'][0]:.4g}, grad_norm {h['grad_norm'][0]:.3g}, "
        f"clip_rate {h['clip_rate'][0]:.1%}, nonfinite_steps {h['nonfinite_steps'][0]:.0f}; "
        f"loss on the clean data afterwards: {run['clean_loss']:.4g}; predictions "
        f"exactly 0: {run['zero_predictions']:.0%}"
    )
print(
    f"(a model that always predicts 0 has a loss of {np.mean(y2_clean ** 2):.4g} "
    "on the clean data)"
)

fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
kind_colors = {
    "explode": "tab:red",
    "vanish": "tab:purple",
    "nonfinite": "tab:orange",
    "stall": "black",
}
for ax, (name, run) in zip(axes, part2.items()):
    norms = run["norms"]
    steps = np.arange(1, len(norms) + 1)
    floor = 1e-4
    finite = np.isfinite(norms)
    positive = finite & (norms > 0)
    # NaN breaks the line where a norm was 0 or not finite.
    ax.plot(
        steps,
        np.where(positive, norms, np.nan),
        ".-",
        lw=0.8,
        ms=3,
        label="global norm",
    )
    ax.plot(
        steps[finite & (norms == 0)],
        np.full((finite & (norms == 0)).sum(), floor),
        "v",
        color="tab:purple",
        ms=4,
        label="exactly 0 (drawn at 1e-4)",
    )
    for s in steps[~finite]:
        ax.axvspan(s - 0.5, s + 0.5, color="tab:orange", alpha=0.3, lw=0)
    ax.plot([], [], "s", color="tab:orange", alpha=0.3, label="NaN gradient (skipped)")
    for event in run["events"]:
        ax.axvline(event.step, color=kind_colors[event.kind], ls="--", lw=1)
        ax.text(
            event.step,
            3e3,
            f" {event.kind}",
            color=kind_colors[event.kind],
            rotation=90,
            va="top",
            fontsize=9,
        )
    ax.set(
        yscale="log",
        ylim=(floor / 3, 1e4),
        ylabel="global norm before clipping",
        title=f"{name}: loss on the clean data afterwards {run['clean_loss']:.3g}",
    )
    ax.legend(loc="upper right", fontsize=8)
axes[-1].set_xlabel("step")
save(fig, "03_alarms.png")

"""
What to look for in the figure and the printed events:

- **explode**: the monitor compares each norm with the median of the last 50 (on a
  log scale) and fires when it is `explode_factor` (10) times above it, and above
  their usual spread: a norm that drifts slowly as training goes on raises nothing,
  a spike does.
- **vanish**: fires when the global norm stays below `vanish_threshold` (1e-7) for
  `patience` (10) steps. If it fired in the unclipped run, look at what came just
  before it: the sentinel batch's step pushed the output layer so far that its ReLU
  outputs 0 for every input, a *dead* output, whose gradient is exactly 0; with no
  gradient, nothing can move it again. The printed share of predictions that are
  exactly 0, and the loss on the clean data next to that of always predicting 0,
  say whether that is what happened.
- **nonfinite** and **stall**: the NaN steps were skipped (no weight moved), and the
  run of NaN batches raised a stall: with `nonfinite="skip"` the loss does not turn
  NaN, so without this alarm nothing would tell you that the model had stopped
  learning. The epoch's logged `loss` leaves out the batches whose loss is NaN (the
  monitor's `filter_nonfinite_loss`), which is why it is a number.
- With clipping, the sentinel's step was cut to norm 5 before it reached the weights:
  compare the two runs' losses on the clean data.

In a real run, keep the monitor on: it reads a few numbers per batch that the step
has already computed. Put `GradientHistogramLogger` on when you need to see inside:
it bins the gradients only on logging steps.
"""
