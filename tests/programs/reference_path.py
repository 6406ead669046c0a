"""Runs the clippers' reference inputs through `optimizer.apply`; saves the weights.

The inputs are those of tests/test_clippers.py (the table and its invariants)
and tests/test_adaptive.py (the adaptive loops). Each clipper gets a
`ClippedSGD(learning_rate=1.0)` (momentum 0), whose update is
`w <- w - g_clipped`: the new weights tell the gradient training applied.

tests/test_reference_path.py imports this module to run the one-device paths
of its backend (tests/steps.py: "xla" and "graph" on TensorFlow, "jit" and
"eager" on JAX, "eager" on torch) in its own process, and runs it as a
program for "mirrored" (TensorFlow's `MirroredStrategy`, two replicas, each
applying a part of the gradient): TensorFlow must split the CPU into two
logical devices before it starts, which the test process can't do.

    PYTHONPATH=ROOT:ROOT/tests python reference_path.py OUTPUT.npz
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":  # imported, it runs on the importer's backend
    os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import steps  # noqa: E402
import test_adaptive  # noqa: E402
import test_clippers  # noqa: E402

import keras_clip as kc  # noqa: E402

SEEDS, SCALES = (0, 1, 2), (0.01, 1.0, 30.0)
# Under MirroredStrategy the adaptive loops take these steps of
# `test_adaptive.sequence()`, in order, to keep the program short: past every
# warm-up, the first zero step, two spikes and the NaN step.
MIRRORED_STEPS = (
    *range(64), *range(test_adaptive.NAN_STEP - 2, test_adaptive.NAN_STEP + 4)
)


class Trainer:
    """A `ClippedSGD(learning_rate=1.0)` on float32 variables of `shapes`.

    `step(grads, params)` sets the variables to `params` (zeros if `None`),
    applies `grads` and returns the new weights and `gradient_stats()`. On
    one device the step runs on `path` (tests/steps.py); a compiled step is
    traced once: the gradients are a list of tensors of fixed shapes.

    Under `strategy` (TensorFlow, two replicas) the first replica applies
    `a = fl(3g/4)` of each gradient and the second `g - a`: exact in float32
    (Sterbenz: `a` is within a factor 2 of `g`), and so is their sum, `g`.
    The parts differ, so neither can pass for the sum, doubled.
    """

    def __init__(self, clipper, shapes, path="graph", strategy=None):
        scope = strategy.scope() if strategy else contextlib.nullcontext()
        with scope:
            self.variables = [
                keras.Variable(np.zeros(s, "float32"), name=f"w{i}")
                for i, s in enumerate(shapes)
            ]
            self.optimizer = kc.ClippedSGD(learning_rate=1.0, clipper=clipper)
            self.optimizer.build(self.variables)
        if strategy is None:
            self.function = steps.compiled_apply(self.optimizer, self.variables, path)
        else:
            self.function = MirroredStep(self.optimizer, self.variables, strategy)

    def step(self, grads, params=None):
        for i, v in enumerate(self.variables):
            v.assign(np.zeros(v.shape, "float32") if params is None else params[i])
        self.function([np.asarray(g, "float32") for g in grads])
        return [v.numpy() for v in self.variables], self.optimizer.gradient_stats()

    @property
    def traces(self):
        return self.function.traces


class MirroredStep:
    """`optimizer.apply` in a `tf.function` of `strategy.run`, each replica
    applying its part of the gradient (see `Trainer`)."""

    def __init__(self, optimizer, variables, strategy):
        import tensorflow as tf

        def apply_part(grads):
            # On the replica's device, where a gradient is computed.
            first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
            parts = [tf.where(first, g * 0.75, g - g * 0.75) for g in grads]
            optimizer.apply(parts, variables)

        self.function = tf.function(
            lambda grads: strategy.run(apply_part, args=(grads,))
        )

    def __call__(self, grads):
        import tensorflow as tf

        self.function([tf.constant(g, "float32") for g in grads])

    @property
    def traces(self):
        return self.function.experimental_get_tracing_count()


def table_inputs():
    """{label: (grads, params)} of each table step, in order.

    The table's seeds and scales, then the invariants' inputs, drawn as
    tests/test_clippers.py draws them. `run_table` adds "again": "twice"'s
    clipped gradient, clipped again.
    """
    inputs = {
        f"{seed}/{scale}": test_clippers.random_lists(seed, scale)
        for seed in SEEDS
        for scale in SCALES
    }
    _, params = test_clippers.random_lists(5)
    params[1] = np.zeros_like(params[1])  # a zero weight too (AGC's epsilon)
    inputs["zero"] = ([np.zeros(s, "float32") for s in test_clippers.SHAPES], params)
    inputs["twice"] = test_clippers.random_lists(3, 30.0)
    inputs["inside"] = test_clippers.random_lists(4, 1e-4)
    inputs["bounds"] = test_clippers.random_lists(6, 50.0)
    inputs["one_factor"] = test_clippers.random_lists(7, 10.0)
    return inputs


def start_weights(name, params):
    """The weights a table step starts from: AGC reads them, the rest get zeros.

    On zero weights the new weights are exactly `-g_clipped` (`0 - x` is exact).
    """
    return params if name == "agc" else [np.zeros_like(p) for p in params]


def new_run():
    return {"labels": [], "weights": [], "stats": [], "traces": 0}


def record(run, label, result):
    weights, stats = result
    run["labels"].append(label)
    run["weights"].append(weights)
    run["stats"].append(stats)


def run_table(path="graph", strategy=None):
    """{clipper name: run} over `table_inputs()`, one optimizer per clipper.

    A run holds, for each step in order, its `labels`, the new `weights` and
    the `stats`; and the step's `traces`.
    """
    runs = {}
    for name, (make, _) in test_clippers.TABLE.items():
        trainer = Trainer(make(), test_clippers.SHAPES, path, strategy)
        run = new_run()
        for label, (grads, params) in table_inputs().items():
            record(run, label, trainer.step(grads, start_weights(name, params)))
        start = start_weights(name, table_inputs()["twice"][1])
        twice = run["weights"][run["labels"].index("twice")]
        once = [p - w for p, w in zip(start, twice)]
        record(run, "again", trainer.step(once, start))
        run["traces"] = trainer.traces
        runs[name] = run
    return runs


def run_adaptive(case, path="graph", strategy=None, only=None):
    """The run of `test_adaptive.CASES[case]` over `sequence()` (or its steps `only`).

    The weights start at zero on every step; the labels are the steps' indices.
    """
    make, _ = test_adaptive.CASES[case]
    trainer = Trainer(make(), test_adaptive.SHAPES, path, strategy)
    sequence = test_adaptive.sequence()
    run = new_run()
    for t in range(len(sequence)) if only is None else only:
        record(run, t, trainer.step(sequence[t]))
    run["traces"] = trainer.traces
    return run


# Runs to and from one .npz file (no pickles): each variable's weights stacked
# over the steps, the rest as JSON.


def save(path, runs, replicas):
    arrays, meta = {}, {"replicas": replicas, "runs": {}}
    for key, run in runs.items():
        meta["runs"][key] = {k: run[k] for k in ("labels", "stats", "traces")}
        for i, weights in enumerate(zip(*run["weights"])):
            arrays[f"{key}/{i}"] = np.stack(weights)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load(path):
    """What `save` wrote: `(runs, replicas)`."""
    runs = {}
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        for key, run in meta["runs"].items():
            stacked, i = [], 0
            while f"{key}/{i}" in data:
                stacked.append(data[f"{key}/{i}"])
                i += 1
            run["weights"] = [list(w) for w in zip(*stacked)]
            runs[key] = run
    return runs, meta["replicas"]


def main():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    runs = {f"table/{k}": v for k, v in run_table(strategy=strategy).items()}
    for case in test_adaptive.CASES:
        runs[f"adaptive/{case}"] = run_adaptive(
            case, strategy=strategy, only=MIRRORED_STEPS
        )
    save(sys.argv[1], runs, strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main()
