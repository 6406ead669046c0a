"""Command line: `python -m keras_clip demo` and `python -m keras_clip suggest`.

`demo` trains a recurrent network whose gradients explode with plain Adam,
then with `ClippedAdam` and each clipper (keras_clip/_demo.py), prints a table
and writes TensorBoard logs and a plot. `suggest` measures the demo network's
gradient norms and suggests a clipping threshold (`keras_clip.suggest_threshold`).

Python imports the `keras_clip` package before this module, and the package
imports Keras with TensorFlow's C++ start-up log silenced when it sees the
command line (keras_clip/_quiet.py): nothing comes before a command's own
first line.
"""

import argparse
import os
import sys

from keras_clip import _quiet

# The demo's clipped runs and defaults (keras_clip/_demo.py's `CLIPPERS` and
# `EPOCHS`, repeated here so that `--help` and argument errors need no Keras;
# tests/test_demo.py checks they agree).
DEMO_CLIPPERS = ("value", "norm", "global_norm", "agc", "autoclip", "zclip", "adagc")
DEMO_EPOCHS = 10
DEMO_OUT = "keras_clip_demo"
SUGGEST_STEPS = 100


def run_suggest(steps=SUGGEST_STEPS, seed=0, percentile=90.0, verbose="auto"):
    """Measures the demo model's gradient norms with plain Adam; returns the report.

    The demo's data and model (same seed, same initial weights) compiled with
    `keras.optimizers.Adam`, measured by `keras_clip.suggest_threshold`.
    """
    demo = _quiet.import_quietly("keras_clip._demo")
    keras = demo.keras
    keras.utils.set_random_seed(seed)
    x, y = demo.make_data(seed)
    model = demo.make_model(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(demo.LEARNING_RATE),
        loss="mse",
        jit_compile=True,
    )
    return demo.keras_clip.suggest_threshold(
        model, (x, y), steps=steps, percentile=percentile, batch_size=demo.BATCH_SIZE,
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


def _clipper_names(text):
    """An argparse `type`: comma-separated clipper names (or `all`), as a list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(DEMO_CLIPPERS)
    for name in names:
        if name not in DEMO_CLIPPERS:
            choices = ", ".join((*DEMO_CLIPPERS, "all"))
            raise argparse.ArgumentTypeError(
                f"unknown clipper {name!r} (choose from {choices})"
            )
    if not names:
        raise argparse.ArgumentTypeError("give at least one clipper name")
    return names


def _prog():
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "keras-clip" if name.startswith("keras-clip") else "python -m keras_clip"


def make_parser():
    """The argument parser: two subcommands, `demo` and `suggest`."""
    parser = argparse.ArgumentParser(
        prog=_prog(), description="keras-clip command line."
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo",
        help="train an RNN whose gradients explode with plain Adam and ClippedAdam",
        description=(
            "Trains a ReLU SimpleRNN on the adding problem (30 steps; its "
            "recurrent kernel starts at gain 2, so its gradients explode) with "
            "plain Adam, then with ClippedAdam and each clipper at its defaults: "
            "same seed, same data, same initial weights. Prints a line per run "
            "and epoch, then a table (final and best validation loss, the loss "
            "of predicting the mean, divergence, clip rate, skipped non-finite "
            "steps, peak gradient norm, seconds), and writes TensorBoard logs "
            "and a plot of the loss and gradient norm per step to --out."
        ),
        epilog=(
            "example: %(prog)s --clippers global_norm,zclip --epochs 5"
        ),
    )
    demo.add_argument(
        "--epochs",
        type=_checked(int, lambda v: v >= 1, "must be at least 1"),
        default=DEMO_EPOCHS,
        help=f"epochs of each run (default: {DEMO_EPOCHS})",
    )
    demo.add_argument(
        "--clippers",
        type=_clipper_names,
        default=list(DEMO_CLIPPERS),
        metavar="NAME,...",
        help=(
            "ClippedAdam's runs, after plain Adam's, comma separated: any of "
            f"{', '.join(DEMO_CLIPPERS)}, or all (default: all)"
        ),
    )
    demo.add_argument(
        "--out",
        default=DEMO_OUT,
        help=(
            "directory for the plot (demo.png) and the TensorBoard logs "
            f"(tensorboard/<run>) (default: {DEMO_OUT})"
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
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
    clippers = list(dict.fromkeys(args.clippers))  # in order, once each
    print(
        f"keras-clip demo: {len(clippers) + 1} runs of {args.epochs} "
        f"epoch{'s' if args.epochs > 1 else ''} each on an "
        "RNN whose gradients explode: plain Adam, then ClippedAdam with "
        f"{', '.join(clippers)}.",
        flush=True,
    )
    demo = _quiet.import_quietly("keras_clip._demo")
    rows = demo.run_demo(args.epochs, args.seed, clippers, args.out)
    print(demo.summary(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
