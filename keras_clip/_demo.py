"""The demo behind `python -m keras_clip demo`: exploding gradients in an RNN.

The task is the adding problem (Hochreiter & Schmidhuber, 1997), with which
Pascanu et al. (2013) introduced norm clipping: each of the 30 steps of a
sequence carries a value drawn from U(0, 1) and a marker bit; two steps are
marked (one in each half) and the target is the sum of their two values. Only
a network that carries the first value across up to 29 steps can do better
than predicting the mean target, the trivial baseline (a mean squared error of
about 1/6).

The network is a ReLU `SimpleRNN` of 64 units whose recurrent kernel starts
orthogonal with gain 2: along a sequence the hidden state, and the gradient,
grow like 2**30, so the first gradient norms reach 1e7 and more. The same
initial weights see the same batches with plain Adam, then with `ClippedAdam`
and each clipper at its defaults. Plain Adam divides its update by its running
RMS of past gradients (beta_2 = 0.999: a memory of about a thousand steps),
which those first gradients inflate: once the weights are tamed, its steps are
1e-4 to 1e-6 of their normal size, and its loss stays above the baseline for
the whole run (a stall, not a NaN). A clipper with a fixed threshold keeps
Adam's statistics at the scale of the clipped gradient, and the network learns
the task; one that adapts its threshold to the run's own recent norms
(AutoClip, ZClip) takes the huge norms for normal ones and lets them through.

Each run gets a `GradientMonitor` (its statistics in the progress lines and
TensorBoard's scalars) and a `GradientHistogramLogger`. The losses in the
table are the validation set's (1024 sequences the runs never train on).
"""

import os
import sys
import time

import keras
import numpy as np

import keras_clip

SEQUENCE_LENGTH = 30
SAMPLES = 8192
VALIDATION_SAMPLES = 1024
BATCH_SIZE = 64
UNITS = 64
GAIN = 2.0  # scale of the orthogonal recurrent kernel at initialization
LEARNING_RATE = 4e-3  # decayed along a cosine to a tenth over the run
EPOCHS = 10
LEARNED = 0.1  # a run has learned the task below this share of the baseline
HISTOGRAM_FREQ = 50  # steps between two gradient histograms

# The clipped runs, by name; each clipper with its defaults.
CLIPPERS = {
    "value": keras_clip.ValueClip,
    "norm": keras_clip.NormClip,
    "global_norm": keras_clip.GlobalNormClip,
    "agc": keras_clip.AdaptiveGradClip,
    "autoclip": keras_clip.AutoClip,
    "zclip": keras_clip.ZClip,
    "adagc": keras_clip.AdaGC,
}
PLAIN = "adam"  # the name of the run without clipping
COLUMNS = (
    "run",
    "final loss",
    "best loss",
    "baseline",
    "final/base",
    "diverged",
    "clip rate",
    "skipped",
    "peak norm",
    "seconds",
)


def make_data(seed, samples=SAMPLES, stream=0):
    """Adding-problem inputs `(samples, SEQUENCE_LENGTH, 2)` and targets `(samples, 1)`.

    Channel 0 holds the values, channel 1 the two markers (one in each half of
    the sequence); the target is the sum of the two marked values. `stream`
    draws an independent set from the same seed (the validation set is 1).
    """
    rng = np.random.default_rng([seed, stream])
    x = np.zeros((samples, SEQUENCE_LENGTH, 2), "float32")
    x[:, :, 0] = rng.uniform(size=(samples, SEQUENCE_LENGTH))
    rows = np.arange(samples)
    half = SEQUENCE_LENGTH // 2
    first = rng.integers(0, half, samples)
    second = rng.integers(half, SEQUENCE_LENGTH, samples)
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    y = x[rows, first, 0] + x[rows, second, 0]
    return x, y[:, None]


def make_model(seed):
    """A ReLU `SimpleRNN` whose recurrent kernel starts orthogonal with gain `GAIN`."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SEQUENCE_LENGTH, 2)),
            keras.layers.SimpleRNN(
                UNITS,
                activation="relu",
                recurrent_initializer=keras.initializers.Orthogonal(GAIN, seed=seed),
            ),
            keras.layers.Dense(1),
        ]
    )


def make_optimizer(name, total_steps):
    """The optimizer of run `name`: plain Adam (`PLAIN`) or a `ClippedAdam`.

    Plain Adam is `ClippedAdam(clipper=None, nonfinite="propagate")`: Keras's
    Adam update, bit for bit (tests/test_demo.py checks it), that also records
    each step's gradient norm. Every run decays the learning rate along the
    same cosine.
    """
    learning_rate = keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, total_steps, alpha=0.1
    )
    if name == PLAIN:
        return keras_clip.ClippedAdam(learning_rate, nonfinite="propagate")
    return keras_clip.ClippedAdam(learning_rate, clipper=CLIPPERS[name]())


class _StepLoss(keras.metrics.Metric):
    """The mean squared error of the last batch (Keras's `loss` is the epoch's mean)."""

    def __init__(self, name="step_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable((), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        error = keras.ops.cast(y_true, y_pred.dtype) - y_pred
        self.value.assign(keras.ops.mean(keras.ops.square(error)))

    def result(self):
        return self.value.value  # a tensor (JAX's jit takes no variable)


class _Recorder(keras.callbacks.Callback):
    """Keeps each step's loss and gradient norm; prints a line per epoch.

    On a terminal, the run's line is rewritten each epoch; otherwise each
    epoch gets its own line.
    """

    def __init__(self, label, epochs, clipped, verbose):
        super().__init__()
        self.label = label
        self.epochs = epochs
        self.clipped = clipped
        self.verbose = verbose
        self.step_loss = []
        self.grad_norm = []
        self.val_loss = []
        self._start = time.perf_counter()
        self._tty = verbose and sys.stdout.isatty()

    def on_train_batch_end(self, batch, logs=None):
        self.step_loss.append(float(logs["step_loss"]))
        self.grad_norm.append(self.model.optimizer.gradient_stats()["grad_norm"])

    def on_epoch_end(self, epoch, logs=None):
        self.val_loss.append(float(logs["val_loss"]))
        if not self.verbose:
            return
        line = (
            f"{self.label}  epoch {epoch + 1:>{len(str(self.epochs))}}/{self.epochs}"
            f"  val loss {logs['val_loss']:<9.4g}"
            f" grad norm: mean {logs['grad_norm']:.3g}, max {logs['grad_norm_max']:.3g}"
        )
        if self.clipped:
            line += (
                f"  clipped {logs['clip_rate']:.0%}"
                f"  skipped {int(logs['nonfinite_steps'])}"
            )
        line += f"  {time.perf_counter() - self._start:.0f} s"
        if self._tty:
            end = "\n" if epoch + 1 == self.epochs else ""
            print(f"\r{line}\x1b[K", end=end, flush=True)
        else:
            print(line, flush=True)


def _finite_extreme(reduce, values):
    """`reduce` (`np.min` or `np.max`) of the finite values; NaN if none is."""
    values = np.asarray(values, "float64")
    values = values[np.isfinite(values)]
    return float(reduce(values)) if values.size else float("nan")


def train_run(name, model, initial_weights, data, epochs, seed, out, label, verbose):
    """Trains `model` from `initial_weights` with run `name`'s optimizer.

    Args:
        name: `PLAIN` or a key of `CLIPPERS`.
        model: The model, rebuilt by no run: each sets `initial_weights` and
            compiles it anew.
        initial_weights: The weights every run starts from.
        data: `((x, y), (x_val, y_val), baseline)`.
        epochs: Epochs of the run.
        seed: Seeds the shuffling, so every run sees the same batches.
        out: As in `run_demo`; the TensorBoard logs go to
            `out/tensorboard/<name>`.
        label: The progress lines' prefix.
        verbose: Print the progress lines.

    Returns:
        A dict: the table's cells (`run`, `final_loss`, `best_loss`,
        `baseline`, `diverged`, `clip_rate`, `skipped`, `peak_norm`,
        `seconds`; `clip_rate` and `skipped` are `None` for plain Adam) and
        the per-step arrays `step_loss` and `grad_norm` (before clipping).
    """
    (x, y), (x_val, y_val), baseline = data
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    optimizer = make_optimizer(name, epochs * steps_per_epoch)
    clipped = name != PLAIN
    model.set_weights(initial_weights)
    model.compile(
        optimizer=optimizer, loss="mse", metrics=[_StepLoss()], jit_compile=True
    )
    recorder = _Recorder(label, epochs, clipped, verbose)
    callbacks = [
        keras_clip.GradientMonitor(
            stats=["grad_norm", "grad_norm_max", "clip_rate", "nonfinite_steps"],
            on_nonfinite=None,
            on_stall="warn",
            on_explode=None,
            on_vanish=None,
        )
    ]
    if out is not None:
        log_dir = os.path.join(out, "tensorboard", name)
        callbacks.append(
            keras_clip.GradientHistogramLogger(log_dir, freq=HISTOGRAM_FREQ)
        )
        callbacks.append(keras.callbacks.TensorBoard(log_dir, write_graph=False))
    callbacks.append(recorder)
    keras.utils.set_random_seed(seed)  # the same batches in every run
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=(x_val, y_val),
        callbacks=callbacks,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    stats = optimizer.gradient_stats()
    final = recorder.val_loss[-1]
    finite = np.isfinite(final) and all(
        np.isfinite(w).all() for w in model.get_weights()
    )
    return {
        "run": name,
        "final_loss": final,
        "best_loss": _finite_extreme(np.min, recorder.val_loss),
        "baseline": baseline,
        "diverged": not finite,
        "clip_rate": stats["clip_rate"] if clipped else None,
        "skipped": stats["nonfinite_steps"] if clipped else None,
        "peak_norm": _finite_extreme(np.max, recorder.grad_norm),
        "seconds": seconds,
        "step_loss": np.asarray(recorder.step_loss, "float64"),
        "grad_norm": np.asarray(recorder.grad_norm, "float64"),
    }


def run_demo(epochs=EPOCHS, seed=0, clippers=tuple(CLIPPERS), out=None, verbose=True):
    """Trains plain Adam, then `ClippedAdam` with each of `clippers`.

    Every run starts from the same initial weights and sees the same batches
    in the same order; only the optimizer differs.

    Args:
        epochs: Epochs of each run. Defaults to `EPOCHS`.
        seed: Seed of the data, the initial weights and the shuffling.
            Defaults to 0.
        clippers: Names from `CLIPPERS`, in the order to run them.
            Defaults to all of them.
        out: Directory for the TensorBoard logs (`out/tensorboard/<run>`)
            and the plot (`out/demo.png`); `None` writes nothing. Defaults
            to `None`.
        verbose: Print a progress line per run and epoch. Defaults to `True`.

    Returns:
        A list of dicts, one per run (plain Adam first), as `train_run`
        returns them.
    """
    unknown = [c for c in clippers if c not in CLIPPERS]
    if unknown:
        raise ValueError(
            f"Unknown clipper {unknown[0]!r}: expected one of {list(CLIPPERS)}. "
            f"Received: clippers={list(clippers)!r}"
        )
    x, y = make_data(seed)
    x_val, y_val = make_data(seed, VALIDATION_SAMPLES, stream=1)
    baseline = float(np.mean((y_val - y.mean()) ** 2))
    if verbose:
        print(
            f"The adding problem: {len(x)} sequences of {SEQUENCE_LENGTH} steps "
            f"({len(x_val)} more to validate); a ReLU SimpleRNN({UNITS}), "
            f"recurrent gain {GAIN:g}. Predicting the mean target scores "
            f"{baseline:.4g}.",
            flush=True,
        )
    model = make_model(seed)
    initial_weights = model.get_weights()
    names = [PLAIN, *clippers]
    width = max(len(n) for n in names)
    rows = []
    for i, name in enumerate(names):
        label = f"[{i + 1}/{len(names)}] {name:<{width}}"
        rows.append(
            train_run(
                name,
                model,
                initial_weights,
                data=((x, y), (x_val, y_val), baseline),
                epochs=epochs,
                seed=seed,
                out=out,
                label=label,
                verbose=verbose,
            )
        )
    if out is not None:
        plot(rows, os.path.join(out, "demo.png"), seed)
    return rows


def _cells(row):
    clipped = row["clip_rate"] is not None
    return [
        row["run"],
        f"{row['final_loss']:.4g}",
        f"{row['best_loss']:.4g}",
        f"{row['baseline']:.4g}",
        f"{row['final_loss'] / row['baseline']:.2g}",
        "yes" if row["diverged"] else "no",
        f"{row['clip_rate']:.0%}" if clipped else "-",
        str(row["skipped"]) if clipped else "-",
        f"{row['peak_norm']:.3g}",
        f"{row['seconds']:.1f}",
    ]


def format_table(rows):
    """The rows as an aligned plain-text table with the `COLUMNS`."""
    lines = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        for line in lines
    )


def verdict(row):
    """`"diverged"`, `"learned"` (final loss under `LEARNED` of the baseline's),
    `"stalled"` (at or above the baseline's) or `"partly"` (in between)."""
    ratio = row["final_loss"] / row["baseline"]
    if row["diverged"]:
        return "diverged"
    if ratio < LEARNED:
        return "learned"
    if ratio >= 1.0:
        return "stalled"
    return "partly"


def conclusion(rows):
    """What the runs show, one line per outcome."""
    groups = {}
    for row in rows:
        groups.setdefault(verdict(row), []).append(row["run"])
    titles = {
        "learned": (
            f"Learned the task (final loss under {LEARNED:.0%} of the baseline's)"
        ),
        "partly": "Learned part of it (between that and the baseline's)",
        "stalled": "Stalled (final loss at or above the baseline's: no better "
        "than predicting the mean)",
        "diverged": "Diverged (a weight or the loss is not finite)",
    }
    return "\n".join(
        f"{titles[kind]}: {', '.join(groups[kind])}."
        for kind in titles
        if kind in groups
    )


def summary(rows, out=None):
    """The table, the conclusion and, with `out`, where the outputs are."""
    text = f"{format_table(rows)}\n\n{conclusion(rows)}"
    if out is not None:
        text += (
            f"\n\nPlot: {os.path.join(out, 'demo.png')}"
            f"\nTensorBoard logs: {os.path.join(out, 'tensorboard')}"
            f"  (tensorboard --logdir {os.path.join(out, 'tensorboard')})"
        )
    return text


def plot(rows, path, seed=0):
    """Writes the loss and the global gradient norm of every run, per step, to `path`.

    Both on log scales. A step whose loss or gradient norm is not finite
    leaves a gap in its line; one whose gradient norm is not finite is also
    marked with an x at the top of the gradient norm's panel.
    Imports matplotlib here, on first use.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 8), constrained_layout=True
    )
    # tab10 without its gray, which the reference lines use.
    colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    for i, row in enumerate(rows):
        plain = row["run"] == PLAIN
        style = dict(
            color="black" if plain else colors[(i - 1) % len(colors)],
            linewidth=1.4 if plain else 0.9,
            alpha=1.0 if plain else 0.8,
            zorder=3 if plain else 2,
            label=f"{row['run']} (no clipping)" if plain else row["run"],
        )
        for ax, key in ((ax_loss, "step_loss"), (ax_norm, "grad_norm")):
            values = np.asarray(row[key], "float64")
            steps = np.arange(1, values.size + 1)
            bad = ~np.isfinite(values)
            ax.plot(steps, np.where(bad, np.nan, values), **style)
            if key == "grad_norm" and bad.any():
                ax.plot(
                    steps[bad],
                    np.full(bad.sum(), 0.97),
                    "x",
                    color=style["color"],
                    markersize=4,
                    transform=ax.get_xaxis_transform(),
                )
    baseline = rows[0]["baseline"]
    ax_loss.axhline(
        baseline, color="gray", linestyle="--", linewidth=1,
        label="baseline (predict the mean)",
    )
    ax_loss.axhline(
        LEARNED * baseline, color="gray", linestyle=":", linewidth=1,
        label=f"{LEARNED:.0%} of the baseline",
    )
    ax_norm.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax_loss.set_yscale("log")
    ax_norm.set_yscale("log")
    ax_loss.set_ylabel("training loss of the step's batch (MSE)")
    ax_norm.set_ylabel("global gradient norm, before clipping")
    ax_norm.set_xlabel("optimizer step")
    ax_loss.set_title(
        f"Adding problem, {SEQUENCE_LENGTH} steps: ReLU SimpleRNN({UNITS}), "
        f"recurrent gain {GAIN:g}, seed {seed}. Plain Adam vs ClippedAdam"
    )
    ax_norm.set_title(
        "x at the top: a step whose gradient was not finite; dotted: norm 1 "
        "(the default threshold of value, norm and global_norm)",
        fontsize="small",
    )
    ax_loss.legend(loc="upper right", fontsize="small", ncol=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
