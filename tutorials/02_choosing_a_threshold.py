"""
Title: Choosing a clipping threshold from the gradient norms you observe
Author: keras-clip
Date created: 2026/11/27
Last modified: 2026/11/27
Description: Measure the gradient norms with keras_clip.suggest_threshold, read
    their percentiles, and check the choice by how often clipping fires.
"""

"""
## Introduction

`GlobalNormClip(c)` scales a step's gradient down to norm `c` whenever its norm is
larger. The number `c` has no meaning on its own: it only means something next to the
norms your model actually produces, and those depend on the model, the loss, the data,
the batch size and the stage of training. So the way to choose it is to measure.

What should a good threshold do? Clipping is meant to catch **spikes**: the rare steps
whose gradient is far larger than usual (a bad batch, an outlier, a cliff in the loss
surface), which would otherwise throw the weights far away. It should leave the
ordinary steps alone. That gives a simple check that you can watch during training,
the **clip rate**, the fraction of steps that were clipped:

- near 0%: the threshold is above everything, spikes included; it does nothing;
- a small fraction (roughly 5-20%, a bit above the share of spikes in your data): it
  catches the spikes and leaves the rest;
- near 100%: every step is scaled to norm `c`. That is no longer spike protection but
  a different optimizer: SGD on the gradient's *direction* with a step of
  `learning_rate * c`, in effect a smaller learning rate.

This tutorial measures the norms with `keras_clip.suggest_threshold`, then trains the
same model with a range of thresholds and shows the clip rate and the validation loss
of each. Its figures (PNG) go to `KERAS_CLIP_OUT` (default:
`tutorials/output/02_choosing_a_threshold`). Set `KERAS_CLIP_FAST=1` for a quick run.
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

import keras_clip as kc

FAST = os.environ.get("KERAS_CLIP_FAST", "0") not in ("", "0")
OUT = os.environ.get("KERAS_CLIP_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "output", "02_choosing_a_threshold"
)
os.makedirs(OUT, exist_ok=True)

SEED = 0
EPOCHS = 4 if FAST else 10
FINDER_STEPS = 100 if FAST else 200
FEATURES = 16
BATCH = 32
LEARNING_RATE = 0.02


def save(fig, name):
    """Writes `fig` to the output folder and prints its path."""
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


"""
## Data with occasional bad labels

The target is a smooth function of 16 features plus a little noise. But 3 of the 2048
training rows have a label that is off by 40 (a unit error, a sentinel, a corrupt
record): in each epoch, 3 of the 64 batches of 32 hold one of them (about 5%), and
those batches' gradients are spikes. The validation data is clean.

The model: two `Dense(64, relu)` layers; SGD with momentum 0.9, at a learning rate of
0.02.
"""

rng = np.random.default_rng(SEED)
w_true = rng.standard_normal((FEATURES, 1))


def make_data(n, bad_labels):
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = np.tanh(x @ w_true / 2) + 0.05 * rng.standard_normal((n, 1))
    bad = rng.choice(n, bad_labels, replace=False)
    y[bad] += rng.choice([-40.0, 40.0], (bad_labels, 1))
    return x, y.astype("float32")


x, y = make_data(2048, bad_labels=3)
x_val, y_val = make_data(1024, bad_labels=0)


def make_model():
    keras.utils.set_random_seed(SEED)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )


model = make_model()
initial_weights = model.get_weights()

"""
## Measuring the norms: `suggest_threshold`

`kc.suggest_threshold(model, data, steps=...)` runs that many training steps with the
model's own loss and optimizer (here a plain Keras `SGD`: the finder measures through
a keras-clip copy of it), reads each step's gradient norm *before clipping* from the
statistics the keras-clip step records, and then puts the model and the optimizer
back exactly as they were. It returns a report: the percentiles of the norms, a
suggested threshold for each kind of clipping (by default the 90th percentile, which
clips the largest 10% of the measured steps), and the fraction of the measured steps
each suggestion would have clipped.
"""

model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.9), loss="mse")
report_untrained = kc.suggest_threshold(model, (x, y), steps=FINDER_STEPS, verbose=0)
print(report_untrained)
save(report_untrained.plot(), "02_norms_untrained.png")

"""
Norms change as the model learns: at the start they are typically larger, and as the
model fits the data the ordinary steps' norms come down, while a bad label's error
stays large. A threshold measured on the untrained model may therefore sit far above
the ordinary steps later on. So we train one epoch with the first suggestion
(`report.optimizer()` builds a `ClippedSGD` with the same settings as our `SGD` and the
suggested `GlobalNormClip`), and measure again.
"""

model.compile(optimizer=report_untrained.optimizer(), loss="mse")
model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
report = kc.suggest_threshold(model, (x, y), steps=FINDER_STEPS, verbose=0)
print(report)
save(report.plot(), "02_norms_after_one_epoch.png")
print(
    f"median norm: {report_untrained.percentiles[50]:.3g} untrained, "
    f"{report.percentiles[50]:.3g} after one epoch; suggested threshold: "
    f"{report_untrained.suggested:.3g} untrained, {report.suggested:.3g} after one epoch"
)

"""
In the histogram (right panel of each figure), look for a body, the ordinary steps,
and a tail of much larger norms, the spikes. A good threshold sits at the top of the
body. The percentiles in the printed table say where that is.

## Trying thresholds: the clip rate and the validation loss

Now we train the model from its initial weights with a range of thresholds: the
percentiles 5, 25, 50, 75, 90 (the suggestion) and 99 of the norms measured after one
epoch; one far below every measured norm (a fifth of the 5th percentile), which must
clip every step; the suggestion from the untrained model; and no clipping at all. For
each we record the clip rate (`optimizer.gradient_stats()["clip_rate"]`) and the
validation loss after every epoch.
"""

finite_norms = report.norms[report.finite]
thresholds = {"no clipping": None}
thresholds["below every norm"] = float(np.percentile(finite_norms, 5)) / 5
for p in (5, 25, 50, 75, 90, 99):
    thresholds[f"p{p}"] = float(np.percentile(finite_norms, p))
thresholds["untrained suggestion"] = report_untrained.suggested

results = {}
for name, threshold in thresholds.items():
    model.set_weights(initial_weights)
    keras.utils.set_random_seed(SEED)
    clipper = None if threshold is None else kc.GlobalNormClip(threshold)
    optimizer = kc.ClippedSGD(LEARNING_RATE, momentum=0.9, clipper=clipper)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, validation_data=(x_val, y_val)
    )
    predicted = None if threshold is None else float(np.mean(finite_norms > threshold))
    results[name] = {
        "threshold": threshold,
        "clip_rate": optimizer.gradient_stats()["clip_rate"],
        "predicted": predicted,
        "val_loss": history.history["val_loss"],
    }

print(
    f"\n{'threshold':22s} {'value':>8s} {'clip rate':>10s} {'finder said':>12s} "
    f"{'val loss, epoch 2':>18s} {'final val loss':>15s}"
)
for name, r in results.items():
    value = "-" if r["threshold"] is None else f"{r['threshold']:.3g}"
    predicted = "-" if r["predicted"] is None else f"{r['predicted']:.0%}"
    print(
        f"{name:22s} {value:>8s} {r['clip_rate']:10.0%} {predicted:>12s} "
        f"{r['val_loss'][1]:18.4g} {r['val_loss'][-1]:15.4g}"
    )

"""
The column "finder said" is the fraction of the *measured* steps (the finder's run,
after one epoch) that the threshold would have clipped; "clip rate" is what happened
over the whole training run from the initial weights. They differ where the norms of
the training run differ from the measured ones, which is the drift described above.
"""

fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
clipped_names = [n for n in results if results[n]["threshold"] is not None]
values = [results[n]["threshold"] for n in clipped_names]
rates = [results[n]["clip_rate"] for n in clipped_names]
left.axhspan(0.05, 0.20, color="tab:green", alpha=0.15, label="5-20%")
left.plot(values, rates, "o", color="tab:blue")
for name, value, rate in zip(clipped_names, values, rates):
    left.annotate(
        name, (value, rate), textcoords="offset points", xytext=(5, 5), fontsize=8
    )
left.set(
    xscale="log",
    xlabel="threshold (global norm)",
    ylabel="clip rate in training",
    ylim=(-0.03, 1.08),
    title="How often each threshold fired",
)
left.legend(fontsize=8)
cmap = plt.get_cmap("viridis")
for i, name in enumerate(results):
    r = results[name]
    epochs = np.arange(1, len(r["val_loss"]) + 1)
    if r["threshold"] is None:
        style = dict(color="black", ls="--", lw=2)
    else:
        style = dict(color=cmap(i / len(results)), ls="-")
    right.plot(
        epochs,
        r["val_loss"],
        marker="o",
        ms=3,
        label=f"{name} (clip rate {r['clip_rate']:.0%})",
        **style,
    )
right.set(
    yscale="log",
    xlabel="epoch",
    ylabel="validation MSE (clean data)",
    title="Validation loss per threshold",
)
right.xaxis.set_major_locator(MaxNLocator(integer=True))
right.legend(fontsize=7, loc="lower left")
save(fig, "02_thresholds.png")

"""
## What the run shows

The script sorts the thresholds by their clip rate and reads the validation losses,
rather than asserting the outcome:
"""

none = results["no clipping"]
every = results["below every norm"]
band = [n for n in clipped_names if 0.05 <= results[n]["clip_rate"] <= 0.20]
print(f"no clipping: final validation loss {none['val_loss'][-1]:.4g}")
print(
    f"'below every norm' clipped {every['clip_rate']:.0%} of the steps: validation "
    f"loss {every['val_loss'][1]:.4g} after epoch 2, {every['val_loss'][-1]:.4g} at the end"
)
if band:
    for n in band:
        r = results[n]
        print(
            f"{n} clipped {r['clip_rate']:.0%} (within 5-20%): validation loss "
            f"{r['val_loss'][1]:.4g} after epoch 2, {r['val_loss'][-1]:.4g} at the end"
        )
else:
    print("no threshold clipped between 5% and 20% of the steps in this run")
best = min(clipped_names, key=lambda n: results[n]["val_loss"][-1])
fastest = min(clipped_names, key=lambda n: results[n]["val_loss"][1])
print(
    f"lowest final validation loss: {best} (clip rate {results[best]['clip_rate']:.0%}); "
    f"lowest after epoch 2: {fastest} (clip rate {results[fastest]['clip_rate']:.0%})"
)

"""
How to read it:

- **No clipping**, and a threshold so high that it rarely fires (the 99th
  percentile, which lies in the tail of spikes when they are more than 1% of the
  steps: compare it with the 95th in the printed table): a bad batch throws the
  weights off, and the validation loss jumps around (the right panel).
- **A threshold below every norm** clips 100% of the steps. It is stable, but compare
  how fast its validation loss comes down: each step has length
  `learning_rate * threshold`, whatever the gradient says, so it behaves like a much
  smaller learning rate. A clip rate near 100% is a sign to raise the threshold (or to
  lower the learning rate on purpose).
- **Thresholds at the top of the body** (the 75th and 90th percentiles here) clip
  the spikes and a few of the ordinary steps; theirs are the small clip rates.
  Thresholds lower than that (the 5th to 50th percentiles) also shorten more of the
  ordinary steps (their clip rates are higher), a smaller learning rate for those
  steps, which can help or hurt the final loss: the printed lines say which
  threshold did best at epoch 2 and at the end of this run, and at what clip rate.
  Compare them with the two ends of the range, "clips nothing" and "clips
  everything": those are what the clip rate warns you about.

In practice:

1. Measure the norms with `kc.suggest_threshold(model, data, steps=200)` after the
   first epoch or so, not on the untrained model, and look at `print(report)` and
   `report.plot()`.
2. Start from `report.suggested` (the 90th percentile) or a bit lower if the
   histogram shows the spikes reaching below it: `model.compile(optimizer=
   report.optimizer(), ...)`.
3. Watch the clip rate (`kc.GradientMonitor` puts it in the progress bar and in
   `History`). Near 100%: the threshold is a smaller learning rate; near 0 while the
   loss still spikes: the threshold is too high.
4. If the norms keep drifting, let the threshold follow the run: `kc.AutoClip` clips
   at a percentile of the run's own recent norms, `kc.ZClip` clips the norms that
   stand out from a running mean (tutorial 04).
"""
