"""Command line: `python -m keras_clip demo` and `python -m keras_clip suggest`.

The demo trains one small ReLU RNN twice on the same data from the same initial
weights, once with plain `keras.optimizers.Adam` and once with
`keras_clip.ClippedAdam`, and prints what happened to each run.

The task is the "adding problem" on sequences of different lengths: each step
carries a value in (0, 1) and a marker bit, and the target is the sum of the
two marked values. Most sequences have 5 to 20 steps, one in a hundred has 100;
all are zero-padded in front to 100 steps and a `Masking` layer skips the
padding. The recurrent kernel starts at a large scale, so the hidden state grows
geometrically with the length: gradients are huge on short sequences and
overflow to Inf/NaN on the long ones. One such batch turns every weight of plain
Adam into NaN. ClippedAdam clips the huge gradients and skips the non-finite
steps until training has tamed the recurrent kernel (skipping alone is not
enough: with `clipper=None` it stays stuck).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_clip  # noqa: E402

CLIPPERS = {
    "value": keras_clip.ValueClip,
    "norm": keras_clip.NormClip,
    "global_norm": keras_clip.GlobalNormClip,
    "agc": keras_clip.AdaptiveGradClip,
}

STEPS = 100  # padded length, and the length of the long sequences
SHORT_STEPS = (5, 20)  # range of the short sequences' lengths
LONG_FRACTION = 0.01
SAMPLES = 1024
BATCH_SIZE = 64
UNITS = 32
GAIN = 2.5  # scale of the (orthogonal) recurrent kernel at initialization
LEARNING_RATE = 0.005
EPOCHS = 15
SUGGEST_STEPS = 100


def make_data(seed):
    """The adding problem: inputs `(SAMPLES, STEPS, 2)`, targets `(SAMPLES, 1)`.

    Sequences are zero-padded in front; a value is never exactly zero, so the
    padding is exactly the all-zero steps.
    """
    rng = np.random.default_rng(seed)
    short = rng.integers(SHORT_STEPS[0], SHORT_STEPS[1] + 1, SAMPLES)
    lengths = np.where(rng.uniform(size=SAMPLES) < LONG_FRACTION, STEPS, short)
    x = np.zeros((SAMPLES, STEPS, 2), "float32")
    for row, length in zip(x, lengths):
        row[-length:, 0] = rng.uniform(1e-3, 1.0, length)
        row[STEPS - length + rng.choice(length, 2, replace=False), 1] = 1.0
    y = (x[:, :, 0] * x[:, :, 1]).sum(axis=1, keepdims=True)
    return x, y


def make_model(seed):
    """A masked ReLU `SimpleRNN` whose recurrent kernel starts at a large scale."""
    return keras.Sequential(
        [
            keras.Input((STEPS, 2)),
            keras.layers.Masking(),
            keras.layers.SimpleRNN(
                UNITS,
                activation="relu",
                recurrent_initializer=keras.initializers.Orthogonal(GAIN, seed=seed),
            ),
            keras.layers.Dense(1),
        ]
    )


def train(model, initial_weights, optimizer, x, y, epochs):
    """Trains `model` from `initial_weights`; returns one row of the table."""
    model.set_weights(initial_weights)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    loss = history.history["loss"][-1]
    finite = np.isfinite(loss) and all(
        np.isfinite(w).all() for w in model.get_weights()
    )
    stats = None
    if isinstance(optimizer, keras_clip.ClippingMixin):
        stats = optimizer.gradient_stats()
    return {
        "optimizer": type(optimizer).__name__,
        "loss": float(loss),
        "diverged": not finite,
        "clip_rate": None if stats is None else stats["clip_rate"],
        "nonfinite_steps": None if stats is None else stats["nonfinite_steps"],
        "seconds": seconds,
    }


def run_demo(epochs=EPOCHS, seed=0, clipper="global_norm", max_norm=1.0):
    """Trains with plain Adam, then with `ClippedAdam`; returns the two rows.

    Args:
        epochs: Epochs of each run.
        seed: Seed of the data, the initial weights and the shuffling.
        clipper: One of `CLIPPERS`' names.
        max_norm: The clipper's threshold (the clip factor for `"agc"`).

    Returns:
        A list of two dicts with keys `optimizer`, `loss` (the last epoch's
        mean), `diverged` (the loss or a weight is not finite), `clip_rate`
        and `nonfinite_steps` (`None` for plain Adam) and `seconds`.
    """
    keras.utils.set_random_seed(seed)
    x, y = make_data(seed)
    model = make_model(seed)
    initial_weights = model.get_weights()
    optimizers = [
        keras.optimizers.Adam(LEARNING_RATE),
        keras_clip.ClippedAdam(LEARNING_RATE, clipper=CLIPPERS[clipper](max_norm)),
    ]
    rows = []
    for optimizer in optimizers:
        keras.utils.set_random_seed(seed)
        rows.append(train(model, initial_weights, optimizer, x, y, epochs))
    return rows


def format_table(rows):
    """The rows as an aligned plain-text table."""
    header = ["optimizer", "final loss", "diverged", "clip rate", "skipped", "seconds"]
    lines = [header]
    for row in rows:
        clipped = row["clip_rate"] is not None
        lines.append(
            [
                row["optimizer"],
                f"{row['loss']:.4g}",
                "yes" if row["diverged"] else "no",
                f"{row['clip_rate']:.0%}" if clipped else "-",
                str(row["nonfinite_steps"]) if clipped else "-",
                f"{row['seconds']:.1f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        for line in lines
    )


def conclusion(rows):
    """One line on what the two runs show."""
    plain, clipped = rows
    if clipped["diverged"]:
        return (
            "ClippedAdam did not end finite either: try more --epochs or a "
            "smaller --max-norm."
        )
    if not plain["diverged"]:
        return "Neither run diverged with this seed: try another --seed."
    return (
        "Plain Adam diverged; ClippedAdam kept finite weights, clipped "
        f"{clipped['clip_rate']:.0%} of its steps, skipped "
        f"{clipped['nonfinite_steps']} non-finite ones and reached a loss of "
        f"{clipped['loss']:.3g}."
    )


def run_suggest(steps=SUGGEST_STEPS, seed=0, percentile=90.0, verbose="auto"):
    """Measures the demo model's gradient norms with plain Adam; returns the report.

    The demo's data and model (same seed, same initial weights) compiled with
    `keras.optimizers.Adam`, measured by `keras_clip.suggest_threshold`.
    """
    keras.utils.set_random_seed(seed)
    x, y = make_data(seed)
    model = make_model(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse", jit_compile=True
    )
    return keras_clip.suggest_threshold(
        model, (x, y), steps=steps, percentile=percentile, batch_size=BATCH_SIZE,
        verbose=verbose,
    )


def _checked(convert, check, requirement):
    """An argparse `type` that converts, then checks the value."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value: {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


def make_parser():
    """The argument parser: two subcommands, `demo` and `suggest`."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_clip", description="keras-clip command line."
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo",
        help="train an RNN with exploding gradients with Adam and ClippedAdam",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--epochs",
        type=_checked(int, lambda v: v >= 1, "must be at least 1"),
        default=EPOCHS,
        help=f"epochs of each run (default: {EPOCHS})",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--clipper",
        choices=list(CLIPPERS),
        default="global_norm",
        help="ClippedAdam's clipper (default: global_norm)",
    )
    demo.add_argument(
        "--max-norm",
        type=_checked(float, lambda v: 0 < v < float("inf"), "must be positive"),
        default=1.0,
        help="the clipper's threshold, the clip factor for agc (default: 1.0)",
    )
    suggest = commands.add_parser(
        "suggest",
        help="measure the demo RNN's gradient norms and suggest a clipping threshold",
        description=(
            "Runs keras_clip.suggest_threshold on the demo's task (the same data "
            "and initial weights, plain Adam) and prints the report."
        ),
    )
    suggest.add_argument(
        "--steps",
        type=_checked(int, lambda v: v >= 1, "must be at least 1"),
        default=SUGGEST_STEPS,
        help=f"training steps to measure (default: {SUGGEST_STEPS})",
    )
    suggest.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    suggest.add_argument(
        "--percentile",
        type=_checked(float, lambda v: 0 < v <= 100, "must be in (0, 100]"),
        default=90.0,
        help="the percentile of the norms to suggest (default: 90)",
    )
    return parser


def main(argv=None):
    """Runs the command line; returns the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "suggest":
        report = run_suggest(args.steps, args.seed, args.percentile)
        print(report)
        return 0
    rows = run_demo(args.epochs, args.seed, args.clipper, args.max_norm)
    print(format_table(rows))
    print(conclusion(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
