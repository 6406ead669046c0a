"""keras-clip benchmarks: step time and memory as ratios to plain Adam.

    pip install ".[tensorflow,jax,tensorboard]" optax
    python benchmarks/run.py [--parts a b c d e f g] [--json out.json]
    python benchmarks/run.py --backend jax [--parts a e f]

TensorFlow (the default; every part, a to g, unless `--parts` says which):

(a) the optimizer step alone: 64 tensors of 262,144 float32 (16.8M
    parameters), one XLA-compiled `apply`;
(b) a whole `fit` step, `jit_compile=True`: 2-layer LSTM(256), sequences of
    100 steps of 32 features, batch 64; and each optimizer's step alone on
    the model's variables, the only part a clipper changes: what it adds to
    Adam's, as a fraction of Adam's `fit` step, bounds what it can add to (b);
(c) the (b) step with `GradientMonitor` and `GradientHistogramLogger(freq=100)`,
    and each callback's own host time after a batch;
(d) memory in the (a) loop, each optimizer in its own process: the tensors
    the optimizer keeps, the buffers a step allocates on top of them (its
    peak), and the process's growth (the compiler's memory included);
(e) the `fit` step of many-variable models (`fit_parts.FIT_MODELS`: "mlp",
    40 x Dense(64), 82 variables; "transformer", 4 encoder blocks, 66
    variables), XLA on and off (`jit_compile=True`, `False`), a table each,
    every configuration of (a) and a second Adam;
(f) the first `fit` call of each (e) model (trace, compile, first step: its
    wall time on one batch), measured while (e)'s models are built, as a
    ratio to Adam's, model by model;
(g) the callbacks' cost on a fast step (`fit_parts.FAST_MODEL`: 4 x
    Dense(256), batch 256, `ClippedAdam(global_clipnorm=1.0)`, about 4.5 ms
    here on a quiet machine): `GradientMonitor` (its alarms'
    checks on, their output off) and `GradientHistogramLogger` with
    `freq=100` and `freq=1`, all on one model: what each adds to the step
    without callbacks, and its own `on_train_batch_end` time.

JAX (`--backend jax`, a process of its own: Keras's backend is fixed at its
import): (a) as Keras-JAX's `fit` runs an optimizer (a `jax.jit` of
`stateless_apply`, its values donated; see `jax_step.py`), with optax's
Adam and clipping in the same table; (e) and (f) with `jit_compile=True`
(`--jit-compile on off` adds `False`: eager JAX, op by op, about 0.35 s a
step here, some 40 minutes a model).

Every time is the median over repeats (after warm-up) of the per-step time,
divided by plain Adam's measured in the same process and the same repeat,
with a 95% bootstrap interval for that median (`lo`, `hi`); min and max of
the per-repeat ratios are shown too, and for (a) the ratio to the floor (the
least step that may skip, see `FLOOR`), each rule's to its own least program
with an interval (`of_least`: the floor, AGC's or ValueClip's; the issue's
target, within 0.01), the ratio of a second Adam to the
first (the protocol's own error) and the median ratio in each of the
machine's two states, when it showed both (see `_fast_rounds`).
A last table holds each of the issue's targets against its median and
interval. (a) runs `--rounds` rounds in which every configuration is timed
in a fresh random order, as `--instances` optimizers with slots of their
own, for 3 calls each (where an optimizer's slots land in memory moves its
time by up to 5%: see `part_a`); (b, c) run `--repeats` such rounds of 3
`fit` steps each (after one left out). (e) runs `--fit-rounds` rounds
(300) in which each of `--fit-instances` models (2) per configuration runs
`--fit-steps` + 1 `train_on_batch` calls (2 + 1; the first left out), the
compiled step `fit` runs; with `--fit-protocol fit`, 20 rounds of one `fit`
call of 10 measured steps, a `fit` step timed from one batch's
`on_train_batch_begin` to the next's, every callback's work included, the
first batch left out. (g) runs `--callback-rounds` rounds
(15) of one `fit` call of `--callback-steps` measured steps (50) per
configuration. `--models`, `--jit-compile` and `--configs` pick a subset
of (e, f) (and of (a), for `--configs`): the defaults run everything.
Each group of parts (a; b, c; d; e, f; g) runs in a process of its own.
Not part of the test run.
"""

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
# The parts in other files (`fit_parts`, `jax_step`, `optax_ref`) import
# their helpers from `run`: this very module, also when run as a script.
sys.modules.setdefault("run", sys.modules[__name__])

STEP_CONFIGS = {
    # name -> optimizer source (evaluated with keras and kc in scope)
    "Adam": "keras.optimizers.Adam(1e-3)",
    "Adam(global_clipnorm) [Keras]": "keras.optimizers.Adam(1e-3, global_clipnorm=1.0)",
    "Adam(clipnorm) [Keras]": "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    "Adam(clipvalue) [Keras]": "keras.optimizers.Adam(1e-3, clipvalue=1.0)",
    "ClippedAdam() no clipper": "kc.ClippedAdam(1e-3)",
    "GlobalNormClip": "kc.ClippedAdam(1e-3, clipper=kc.GlobalNormClip(1.0))",
    "NormClip": "kc.ClippedAdam(1e-3, clipper=kc.NormClip(1.0))",
    "ValueClip": "kc.ClippedAdam(1e-3, clipper=kc.ValueClip(1.0))",
    "AdaptiveGradClip": "kc.ClippedAdam(1e-3, clipper=kc.AdaptiveGradClip())",
    "AutoClip": "kc.ClippedAdam(1e-3, clipper=kc.AutoClip())",
    "ZClip": "kc.ClippedAdam(1e-3, clipper=kc.ZClip())",
    "AdaGC": "kc.ClippedAdam(1e-3, clipper=kc.AdaGC())",
}
FIT_CONFIGS = [
    "Adam", "Adam(global_clipnorm) [Keras]", "Adam(clipnorm) [Keras]",
    "Adam(clipvalue) [Keras]", "GlobalNormClip", "NormClip", "ValueClip",
    "AdaptiveGradClip",
]


def _optimizer(name):
    import keras  # noqa: F401

    import keras_clip as kc  # noqa: F401

    return eval(STEP_CONFIGS[name])


def _interval(values, resamples=2000):
    """A 95% bootstrap interval for the median of `values` (seeded)."""
    values = np.asarray(values)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(values), (resamples, len(values)))
    medians = np.median(values[picks], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def _summary(times, base):
    """Median, min and max of per-repeat ratios to the base configuration,
    and a 95% interval for the median (`lo`, `hi`)."""
    out = {}
    for name, ts in times.items():
        ratios = np.array(ts) / np.array(times[base])
        lo, hi = _interval(ratios)
        out[name] = {
            "ms": float(np.median(ts) * 1e3),
            "ratio": float(np.median(ratios)),
            "lo": lo,
            "hi": hi,
            "min": float(ratios.min()),
            "max": float(ratios.max()),
        }
    return out


# The targets: (part, row, key, bound). A target is met when the
# median is within its bound; the 95% interval says whether the machine's
# noise could have put it on the other side. (a) on TensorFlow and (b, c);
# the other parts' bounds are in `_targets`.
TARGETS = [
    ("a", "GlobalNormClip", "ratio", 1.03),
    ("a", "NormClip", "ratio", 1.03),
    ("a", "ValueClip", "ratio", 1.02),
    ("a", "AdaptiveGradClip", "ratio", 1.10),
    ("a", "AutoClip", "ratio", 1.05),
    ("a", "ZClip", "ratio", 1.05),
    ("a", "AdaGC", "ratio", 1.05),
    ("bc", "GlobalNormClip", "ratio", 1.03),
    ("bc", "NormClip", "ratio", 1.03),
    ("bc", "ValueClip", "ratio", 1.03),
    ("bc", "AdaptiveGradClip", "ratio", 1.03),
]
RULES = [
    "GlobalNormClip", "NormClip", "ValueClip", "AdaptiveGradClip", "AutoClip",
    "ZClip", "AdaGC",
]
KERAS_CLIP = ["ClippedAdam() no clipper", *RULES]


def _fit_bounds(part, backend, jit_compile):
    """The bounds of one (e) or (f) table: row -> bound on its ratio."""
    if part == "f":
        return dict.fromkeys(KERAS_CLIP, 1.25)
    if backend == "jax":
        # No bound for eager JAX (`jit_compile=False`): nobody trains that way for speed.
        return dict.fromkeys(RULES, 1.05) if jit_compile else {}
    rules, agc = (1.05, 1.10) if jit_compile else (1.10, 1.15)
    return {**dict.fromkeys(RULES, rules), "AdaptiveGradClip": agc}


def _targets(results):
    """Every target these results can answer: (part, table, row, key, bound).

    `table` names one of a part's tables ((e), (f)), or is None.
    """
    import fit_parts

    if results["machine"]["backend"] == "jax":
        rows = [("a", None, name, "ratio", 1.05) for name in RULES]
    else:
        rows = [(part, None, name, key, bound) for part, name, key, bound in TARGETS]
        rows += [("a", None, name, "of_least", 1.01) for name in RULES]
        rows += [
            ("bc", None, MONITOR, "over_b", 0.02),
            ("bc", None, LOGGER_100, "over_b", 0.03),
            ("g", None, fit_parts.MONITOR, "added", 0.05),
            ("g", None, fit_parts.LOGGER_100, "added", 0.03),
        ]
    for part in ("e", "f"):
        for table in results.get(part, {}):
            bounds = _fit_bounds(part, results["machine"]["backend"], _jit_of(table))
            rows += [(part, table, name, "ratio", b) for name, b in bounds.items()]
    return rows


def _notes(results, part, name):
    """For an (a) row on TensorFlow: its ratio to the floor, and each state's
    median with the floor's in the fast state."""
    if part != "a" or "a_state" not in results:
        return ""
    row, floor = results["a"][name], results["a"][FLOOR]
    note = f"; {row['floor']:.3f} of the floor"
    if results["a_state"]["fast_share"]:
        note += (f"; slow state {row['slow']:.3f}, fast {row['fast']:.3f} "
                 f"(the floor there: {floor['fast']:.3f})")
    return note


def _least_a(name):
    """The least program an (a) rule is held against: the floor, or its own."""
    return {"AdaptiveGradClip": FLOOR_AGC, "ValueClip": FLOOR_VALUE}.get(name, FLOOR)


def _least(results, part, name):
    """The row of the least program a rule's target is held against: the
    floor, or in (a) AGC's and ValueClip's own; `None` for (b, c)."""
    if part == "a":
        return _least_a(name)
    if part in ("e", "f"):
        return FIT_FLOOR_AGC if name == "AdaptiveGradClip" else FIT_FLOOR
    return None


def _verdicts(results):
    out = []
    for part, table, name, key, bound in _targets(results):
        rows = results.get(part, {})
        rows = rows.get(table, {}) if table is not None else rows
        if name not in rows:
            continue
        row = rows[name]
        value = row[key]
        prefix = "" if key == "ratio" else key + "_"
        lo, hi = row[prefix + "lo"], row[prefix + "hi"]
        verdict = "met" if value <= bound else "not met"
        if lo <= bound < hi:
            verdict += " (within noise)"
        least = rows.get(_least(results, part, name)) if key == "ratio" else None
        if verdict != "met" and least is not None and least["ratio"] > bound:
            verdict += (f"; the least program reads {least['ratio']:.3f} "
                        f"[{least['lo']:.3f}, {least['hi']:.3f}], above the bound")
        out.append((part, table, name, key, bound, value, lo, hi, verdict))
    return out


def _step_setup(seed=0):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.standard_normal(262_144).astype("float32") * 0.01)
        for _ in range(64)
    ]
    grads = [tf.constant(rng.standard_normal(262_144).astype("float32")) for _ in range(64)]
    return variables, grads


def part_a(rounds, calls=3, instances=3, names=None):
    """Step time of each configuration, interleaved finely.

    Each round times every configuration in a fresh random order, so that a
    slow spell of the machine hits all of them alike; ratios are taken
    within a round. Each configuration runs as `instances` optimizers, each
    with slots of its own, timed for `calls` calls each: where an
    optimizer's slots land in memory moves its step time by up to 5% for the
    whole run (a second Adam measured 0.960 [0.939, 0.982] of the first), so
    a configuration's round time is the mean over its instances.
    `names`: the configurations (default: all of `STEP_CONFIGS`).
    """
    import keras_clip as kc

    variables, grads = _step_setup()

    def apply(make):
        def step(opt):
            return lambda: opt.apply(grads, variables)

        return [step(make()) for _ in range(instances)]

    steps = {name: apply(lambda name=name: _optimizer(name)) for name in names or STEP_CONFIGS}
    # Where the time goes: the two parts every rule needs.
    steps[UPDATE_ALONE] = apply(_chained_adam)
    steps[NORM_ALONE] = [lambda: kc.ops.global_norm(grads)]
    # The least a step that may skip does: every gradient read before the
    # first write (the norm), then the update in our order; nothing else.
    steps[FLOOR] = apply(lambda: _chained_adam(norm_first=True))
    # ... and each weight's norm right before its update: the least for AGC.
    steps[FLOOR_AGC] = apply(lambda: _chained_adam(norm_first=True, weight_norms=True))
    # ... or ValueClip's two sums of each gradient: the least for ValueClip.
    steps[FLOOR_VALUE] = apply(lambda: _chained_adam(norm_first=True, value_sums=True))
    # More Adams: their ratio to the first ones is the protocol's own error.
    steps[ADAM_AGAIN] = apply(lambda: _optimizer("Adam"))
    times = _interleaved(steps, rounds, calls)
    out = _summary(times, "Adam")
    # How far each step is above the floor, round by round.
    for name, row in out.items():
        row["floor"] = float(np.median(np.array(times[name]) / np.array(times[FLOOR])))
    # The (a) target: each rule within 0.01 of its own least program,
    # round by round, with an interval (the floor column has none).
    for name in [n for n in RULES if n in out]:
        ratios = np.array(times[name]) / np.array(times[_least_a(name)])
        lo, hi = _interval(ratios)
        out[name].update(of_least=float(np.median(ratios)), of_least_lo=lo, of_least_hi=hi)
    # The machine's two states (see `_fast_rounds`), each on its own.
    fast = _fast_rounds(times)
    states = {} if fast is None else {"fast": fast, "slow": ~fast}
    adam = np.array(times["Adam"])
    for name, row in out.items():
        ratios = np.array(times[name]) / adam
        for label in ("fast", "slow"):
            row[label] = float(np.median(ratios[states[label]])) if states else None
    state = {"fast_share": 0.0 if fast is None else float(fast.mean())}
    for label, rounds_in in states.items():
        state[f"adam_ms_{label}"] = float(np.median(adam[rounds_in]) * 1e3)
    # Every round's time, in ms, for a later look (JSON only).
    state["rounds_ms"] = {name: [t * 1e3 for t in ts] for name, ts in times.items()}
    return out, state


def _fast_rounds(times, least=0.1, separation=4.0):
    """The rounds the machine ran in its fast state, or `None` if one state.

    This machine switches, for minutes at a time, between two states: its
    memory to itself, or shared with other work (in one run, 23% of the
    rounds in the first, where every ratio rose). A round's speed is the mean, over
    every configuration, of its log time less that configuration's median
    (not Adam's time alone: picking rounds by the ratios' denominator would
    bias them). The rounds are split in two where the spread within each
    side is least; the split counts if each side holds at least `least` of
    the rounds and the sides' means lie `separation` pooled standard
    deviations apart.
    """
    logs = np.log(np.array(list(times.values())))
    speed = np.mean(logs - np.median(logs, axis=1, keepdims=True), axis=0)
    ordered = np.sort(speed)
    n = len(ordered)
    smallest = max(2, int(np.ceil(least * n)))
    best = None
    for k in range(smallest, n - smallest + 1):
        spread = ordered[:k].var() * k + ordered[k:].var() * (n - k)
        if best is None or spread < best[0]:
            best = (spread, k)
    if best is None:
        return None
    spread, k = best
    gap = ordered[k:].mean() - ordered[:k].mean()
    if gap <= separation * np.sqrt(spread / n):
        return None
    return speed < (ordered[k - 1] + ordered[k]) / 2


def _interleaved(steps, rounds, calls):
    """Compiles each step with XLA and times it (see `_timed_rounds`).

    `steps` maps a name to a step or to a list of instances of it.
    """
    import tensorflow as tf

    compiled = {
        name: [
            tf.function(s, jit_compile=True)
            for s in (step if isinstance(step, list) else [step])
        ]
        for name, step in steps.items()
    }
    return _timed_rounds(compiled, rounds, calls)


def _timed_rounds(instances, rounds, calls, warmup=3):
    """Times callables, `calls` calls per round, in a fresh order each round.

    `instances` maps a name to a list of callables, each a step that
    returns once its work is done (no framework of its own: `optax_ref.py`
    uses it too). Each is called `warmup` times first. Returns each name's
    per-round time, in seconds: the median of an instance's calls, averaged
    over the name's instances (see `_rounds`).
    """
    for group in instances.values():
        for fn in group:
            for _ in range(warmup):
                fn()

    def timed(fn):
        def measure():
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return np.median(ts)

        return measure

    return _rounds(
        {name: [timed(fn) for fn in group] for name, group in instances.items()},
        rounds,
    )


def _rounds(measures, rounds, warmup=0):
    """The benchmarks' protocol: every configuration in every round, in a fresh order.

    `measures` maps a name to a list of callables, one per instance of that
    configuration, each measuring it once and returning a time in seconds.
    Each is called `warmup` times first (results dropped). In each round the
    names come in a fresh random order (so a slow spell of the machine hits
    all of them alike) and each of a name's callables is called once.
    Returns each name's per-round time: the mean over its instances.
    """
    for group in measures.values():
        for measure in group:
            for _ in range(warmup):
                measure()
    times = {name: [] for name in measures}
    order = list(measures)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(float(np.mean([measure() for measure in measures[name]])))
    return times


def _optimizer_steps(variables, rounds=40, calls=20):
    """Each (b) optimizer's step alone, on copies of the model's variables.

    The part of a `fit` step a clipper can change: its time, and its
    difference to Adam's (round by round), in ms.
    """
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    copies = [keras.Variable(np.asarray(v.numpy())) for v in variables]
    grads = [
        tf.constant(rng.standard_normal(v.shape).astype("float32") * 0.01)
        for v in variables
    ]
    steps = {}
    for name in FIT_CONFIGS:
        opt = _optimizer(name)
        steps[name] = lambda opt=opt: opt.apply(grads, copies)
    times = _interleaved(steps, rounds, calls)
    adam = np.array(times["Adam"])
    return {
        name: (float(np.median(ts) * 1e3), float(np.median(np.array(ts) - adam) * 1e3))
        for name, ts in times.items()
    }


UPDATE_ALONE = "(Adam's update in keras-clip's order, alone)"
NORM_ALONE = "(the gradients' norm, alone)"
FLOOR = "(the norm, then the update: the least with skip)"
ADAM_AGAIN = "(Adam again: the protocol's own error)"
FLOOR_AGC = "(the same and each weight's norm: the least for AGC)"
FLOOR_VALUE = "(the same and ValueClip's two sums: the least for ValueClip)"
FIT_FLOOR = "(Adam, masked by the norm's finiteness: the least with skip)"
FIT_FLOOR_AGC = "(the same and each weight's norm: the least for AGC)"


def _guarded_adam(weight_norms=False):
    """Keras's Adam with the least a step that may skip must do, for (e).

    The gradients' global norm (`keras_clip.ops.global_norm`) first, then
    Keras's own update with every assignment masked by the norm's
    finiteness (a product, a select for `assign`), non-finite gradients
    zeroed: keras-clip's `nonfinite="skip"` without its statistics, clipper
    state or update order. With `weight_norms`, each gradient is also
    masked by its weight's norm's finiteness, taken right before its
    update: the least AGC reads on top (not its unit norms, nor the
    factors).
    """
    import keras
    from keras import ops

    import keras_clip as kc
    from keras_clip import backend

    class GuardedAdam(keras.optimizers.Adam):
        def _backend_update_step(self, grads, variables, learning_rate):
            keep = ops.isfinite(kc.ops.global_norm(grads))
            grads = [ops.where(keep, g, ops.zeros((), g.dtype)) for g in grads]
            self.__dict__["keep"] = keep  # (past Keras's attribute tracking)
            try:
                super()._backend_update_step(grads, variables, learning_rate)
            finally:
                self.__dict__["keep"] = None

        def update_step(self, gradient, variable, learning_rate):
            if weight_norms:
                weight = backend.read(variable)
                finite = ops.isfinite(kc.ops.global_norm([weight]))
                gradient = ops.where(finite, gradient, ops.zeros((), gradient.dtype))
            super().update_step(gradient, variable, learning_rate)

        def assign(self, variable, value):
            keep = self.__dict__.get("keep")
            if keep is not None:
                value = ops.where(keep, value, ops.cast(variable.value, value.dtype))
            super().assign(variable, value)

        def assign_add(self, variable, value):
            keep = self.__dict__.get("keep")
            if keep is not None:
                value = value * ops.cast(keep, value.dtype)
            super().assign_add(variable, value)

        def assign_sub(self, variable, value):
            keep = self.__dict__.get("keep")
            if keep is not None:
                value = value * ops.cast(keep, value.dtype)
            super().assign_sub(variable, value)

    return GuardedAdam(1e-3)


def _chained_adam(norm_first=False, weight_norms=False, value_sums=False):
    """Keras's Adam, updating in keras-clip's order, with nothing else.

    The update part of a `ClippedAdam` step (see `keras_clip.backend.
    UpdateChain`): no clipping, no statistics, and no norm unless
    `norm_first`: then every gradient waits for the global norm (through a
    select on a predicate that is always false), as in a step that skips
    non-finite gradients. With `weight_norms`, each gradient also waits for
    its weight's norm, taken right before its update, as AGC's does. With
    `value_sums`, the global norm also waits for `ValueClip`'s two sums of
    each gradient (its clipped squares, how far clipping moves its elements)
    against a threshold in a variable, as `ValueClip`'s is.
    """
    import keras
    import tensorflow as tf

    import keras_clip as kc
    from keras_clip import backend

    threshold = tf.Variable(1.0) if value_sums else None

    def norm_and_value_sums(grads):
        # The squares and ValueClip's own two terms in one pass, as its step
        # takes them (`ops.tensor_sums`).
        terms = kc.ValueClip().tensor_terms({"threshold": threshold.read_value()}, None)
        return tf.reduce_sum(kc.ops.tensor_sums(grads, terms))

    class ChainedAdam(keras.optimizers.Adam):
        chain = None

        def _backend_update_step(self, grads, variables, learning_rate):
            if norm_first:
                total = norm_and_value_sums(grads) if value_sums else kc.ops.global_norm(grads)
                never = backend.opaque_false(total)
                grads = [tf.where(never, -g, g) for g in grads]
            self.chain = backend.UpdateChain()
            try:
                super()._backend_update_step(grads[::-1], variables[::-1], learning_rate)
            finally:
                self.chain = None

        def update_step(self, gradient, variable, learning_rate):
            if self.chain is None:
                return super().update_step(gradient, variable, learning_rate)
            gradient = self.chain.after_previous(gradient)
            done = ()
            if weight_norms:
                weight = self.chain.after_previous(backend.read(variable))
                weight_norm = kc.ops.global_norm([weight])
                gradient = tf.where(backend.opaque_false(weight_norm), -gradient, gradient)
                done = (weight_norm,)
            super().update_step(gradient, variable, learning_rate)
            self.chain.link(variable, *done)

    return ChainedAdam(1e-3)


class _StepTimer:
    """Per-batch wall time of `fit` (a Keras callback, duck-typed)."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(s, batch, logs=None):
                s.t = time.perf_counter()

            def on_train_batch_end(s, batch, logs=None):
                s.times.append(time.perf_counter() - s.t)

        self.callback = Timer()
        self.callback.times = []


def part_bc(rounds, steps=3, with_callbacks=True):
    """`fit` step time of each configuration, interleaved by rounds.

    Each round runs `steps` steps of every configuration in a fresh random
    order (the median step counts). Each `fit` call runs one step more, its
    first, which is left out: it holds `fit`'s own setup and, with the
    histogram logger (which adds its probe to the step), a compilation. The
    histogram logger writes on one step in `freq`: its cost at `freq=100` is
    the step without writing plus 1/100 of what a writing step adds,
    measured with `freq=1`.
    """
    import keras

    import keras_clip as kc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * (steps + 1), 100, 32)).astype("float32")
    y = rng.standard_normal((64 * (steps + 1), 1)).astype("float32") * 10

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((100, 32)),
            keras.layers.LSTM(256, return_sequences=True),
            keras.layers.LSTM(256),
            keras.layers.Dense(1),
        ])

    runs = {}
    configs = [(n, n, []) for n in FIT_CONFIGS]
    if with_callbacks:
        log_dir = tempfile.mkdtemp(prefix="kc-bench-")
        configs += [
            (MONITOR, "GlobalNormClip", [lambda: kc.GradientMonitor(**QUIET)]),
            (LOGGER_1, "GlobalNormClip",
             [lambda: kc.GradientHistogramLogger(log_dir + "/1", freq=1)]),
            (LOGGER_100, "GlobalNormClip",
             [lambda: kc.GradientHistogramLogger(log_dir + "/100", freq=100)]),
        ]
    for label, opt_name, callbacks in configs:
        if label == MONITOR:
            # The monitor changes nothing in the step: it runs on the very
            # model `GlobalNormClip` runs without it. (Two models differ by
            # where their buffers land, as two optimizers do in (a).)
            m = runs[opt_name][0]
        else:
            m = model()
            m.compile(_optimizer(opt_name), "mse", jit_compile=True)
        cbs = [_timed_batch_end(make()) for make in callbacks]
        m.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0, callbacks=cbs)
        runs[label] = (m, cbs)

    def measure(label):
        m, cbs = runs[label]
        timer = _StepTimer()
        m.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False,
              callbacks=cbs + [timer.callback])
        return float(np.median(timer.callback.times[1:]))

    times = _rounds({label: [functools.partial(measure, label)] for label in runs}, rounds)
    # The optimizer's own share of the step: what a clipper can add to it.
    alone = _optimizer_steps(runs["Adam"][0].trainable_variables)
    if with_callbacks:
        quiet, writing = np.array(times[LOGGER_100]), np.array(times[LOGGER_1])
        times[LOGGER_100] = list(quiet + np.maximum(writing - quiet, 0) / 100)
    out = _summary(times, "Adam")
    for name, (ms, added_ms) in alone.items():
        out[name]["opt_ms"] = ms
        # The most the optimizer's step can move the `fit` step's ratio.
        out[name]["opt_added"] = added_ms / out["Adam"]["ms"]
    if with_callbacks:
        # What a callback adds to the same step without it, round by round.
        for label in (MONITOR, LOGGER_100):
            added = np.array(times[label]) / np.array(times["GlobalNormClip"]) - 1
            out[label]["over_b"] = float(np.median(added))
            out[label]["over_b_lo"], out[label]["over_b_hi"] = _interval(added)
        # The callback's own host time after each batch (the monitor changes
        # nothing in the step, so this is all it adds), as a share of Adam's
        # `fit` step: noise-free where the ratios above scatter by hundredths.
        for label in (MONITOR, LOGGER_1, LOGGER_100):
            spent = [t for cb in runs[label][1] for t in cb.batch_end_times]
            out[label]["callback_ms"] = float(np.median(spent) * 1e3)
            out[label]["callback_share"] = out[label]["callback_ms"] / out["Adam"]["ms"]
    return out


def _timed_batch_end(callback):
    """`callback`, recording the wall time of each `on_train_batch_end`."""
    inner = callback.on_train_batch_end
    callback.batch_end_times = []

    def on_train_batch_end(batch, logs=None):
        start = time.perf_counter()
        inner(batch, logs)
        callback.batch_end_times.append(time.perf_counter() - start)

    callback.on_train_batch_end = on_train_batch_end
    return callback


MONITOR = "GlobalNormClip + GradientMonitor"
# The monitor's alarms fire on the benchmark's random data; their checks run,
# their text is not a result.
QUIET = {"on_nonfinite": None, "on_stall": None, "on_explode": None, "on_vanish": None}
LOGGER_1 = "GlobalNormClip + GradientHistogramLogger(freq=1)"
LOGGER_100 = "GlobalNormClip + GradientHistogramLogger(freq=100), amortized"


def _memory_child(name):
    import tensorflow as tf

    def allocated():
        return tf.config.experimental.get_memory_info("CPU:0")["current"] / 2**20

    variables, grads = _step_setup()
    rss, before = _resident_mb(), allocated()
    opt = _optimizer(name)
    fn = tf.function(lambda: opt.apply(grads, variables), jit_compile=True)
    for _ in range(10):
        fn()
    state = allocated() - before
    tf.config.experimental.reset_memory_stats("CPU:0")
    current = allocated()
    fn()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20 - current
    print(json.dumps({
        "state_mb": state, "step_peak_mb": peak, "rss_mb": _resident_mb() - rss,
    }))


def _resident_mb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def part_d():
    """Memory of each optimizer, each in its own process.

    `state_mb`: tensors the optimizer keeps (slots, clipper state,
    statistics); `step_peak_mb`: buffers a step allocates on top of them, at
    its peak (a copy of the gradients would be 64 MB); `rss_mb`: what the
    process grew by, the compiler's memory included.
    """
    out = {}
    for name in STEP_CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name],
            capture_output=True, text=True, check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["Adam"]["state_mb"]
    for row in out.values():
        row["state_ratio"] = row["state_mb"] / base
    return out


def _table(title, rows, keys=("ms", "ratio", "lo", "hi", "min", "max")):
    print(f"\n{title}")
    width = max(len(n) for n in rows) + 2
    print("".ljust(width) + "".join(k.rjust(13) for k in keys))
    for name, row in rows.items():
        print(name.ljust(width) + "".join(
            "-".rjust(13) if row[k] is None
            else f"{row[k]:13.1f}" if k.endswith("mb")
            else f"{row[k]:+13.4f}" if "added" in k
            else f"{row[k]:13.3f}"
            for k in keys
        ))


# The parts each backend runs (b, c, d are TensorFlow's programs; (g) is
# measured on TensorFlow only).
PARTS = {"tensorflow": list("abcdefg"), "jax": list("aef")}
# (e)'s protocols (see `fit_parts.part_ef`): default rounds and measured steps.
FIT_PROTOCOLS = {"batch": (300, 2), "fit": (20, 10)}


def _arguments(argv):
    import fit_parts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax"], default="tensorflow",
                        help="Keras's backend; jax runs (a, e, f) only. Defaults to tensorflow.")
    parser.add_argument("--parts", nargs="+", choices=PARTS["tensorflow"],
                        help="default: all of a-g on TensorFlow, a e f on JAX")
    parser.add_argument("--repeats", type=int, default=12,
                        help="interleaved rounds of (b, c) (at least 5)")
    parser.add_argument("--rounds", type=int, default=120,
                        help="interleaved rounds of (a) (at least 5)")
    parser.add_argument("--instances", type=int, default=3,
                        help="optimizers per (a) configuration, each with its own slots")
    parser.add_argument("--configs", nargs="+", choices=list(STEP_CONFIGS), metavar="NAME",
                        help="only these configurations in (a, e, f), Adam always "
                        "(default: all; quote names with spaces: "
                        + ", ".join(repr(n) for n in STEP_CONFIGS) + ")")
    parser.add_argument("--models", nargs="+", choices=list(fit_parts.FIT_MODELS),
                        default=list(fit_parts.FIT_MODELS), help="the models of (e, f)")
    parser.add_argument("--jit-compile", nargs="+", choices=["on", "off"],
                        help='the jit_compile settings of (e, f); default: "on off" on '
                        'TensorFlow, "on" on JAX (off is eager JAX, op by op: about '
                        "0.35 s a step here, 40 minutes a model at the defaults)")
    parser.add_argument("--fit-protocol", choices=list(FIT_PROTOCOLS), default="batch",
                        help="how (e) times a step: train_on_batch calls (batch), "
                        "or fit calls (fit); see fit_parts.part_ef")
    parser.add_argument("--fit-rounds", type=int,
                        help="interleaved rounds of (e) (at least 3; default: "
                        + ", ".join(f"{v[0]} with {k}" for k, v in FIT_PROTOCOLS.items()) + ")")
    parser.add_argument("--fit-instances", type=int, default=2,
                        help="compiled models per (e, f) configuration")
    parser.add_argument("--fit-steps", type=int,
                        help="measured steps per model and round in (e) (default: "
                        + ", ".join(f"{v[1]} with {k}" for k, v in FIT_PROTOCOLS.items()) + ")")
    parser.add_argument("--callback-rounds", type=int, default=15,
                        help="interleaved rounds of (g) (at least 3)")
    parser.add_argument("--callback-steps", type=int, default=50,
                        help="measured steps per fit call in (g)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--part-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return args
    args.parts = args.parts or PARTS[args.backend]
    rounds, steps = FIT_PROTOCOLS[args.fit_protocol]
    args.fit_rounds = rounds if args.fit_rounds is None else args.fit_rounds
    args.fit_steps = steps if args.fit_steps is None else args.fit_steps
    args.jit_compile = args.jit_compile or (["on"] if args.backend == "jax" else ["on", "off"])
    other = sorted(set(args.parts) - set(PARTS[args.backend]))
    if other:
        parser.error(f"--backend {args.backend} runs the parts {' '.join(PARTS[args.backend])}. "
                     f"Received: --parts {' '.join(other)}")
    for name, least in (("repeats", 5), ("rounds", 5), ("instances", 1),
                        ("fit_rounds", 3), ("fit_instances", 1), ("fit_steps", 1),
                        ("callback_rounds", 3), ("callback_steps", 1)):
        value = getattr(args, name)
        if value < least:
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} must be at least {least}. Received: {value}")
    if args.backend == "jax" and "a" in args.parts:
        try:
            import optax  # noqa: F401
        except ImportError as error:
            parser.error("(a) on JAX runs optax too: pip install optax. "
                         f"Received: {error}")
    if "g" in args.parts:
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            parser.error("(g) runs GradientHistogramLogger, which writes through "
                         'TensorBoard: pip install ".[tensorboard]". '
                         f"Received: {error}")
    return args


def _configs(chosen=None):
    """`STEP_CONFIGS`' names, Adam first, only those `chosen` (Adam always)."""
    return [n for n in STEP_CONFIGS if n == "Adam" or chosen is None or n in chosen]


def _machine(backend):
    import keras

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "backend": backend,
        "keras": keras.__version__,
    }
    if backend == "jax":
        import jax

        machine["jax"] = jax.__version__
        try:
            import optax

            machine["optax"] = optax.__version__
        except ImportError:
            pass
    else:
        import tensorflow as tf

        machine["tensorflow"] = tf.__version__
    return machine


def _run_a(args, results):
    names = _configs(args.configs)
    if args.backend == "jax":
        from jax_step import part_a_jax

        results["a"] = part_a_jax(names, args.rounds, instances=args.instances)
        _table("(a) optimizer step alone, 64 x 262,144 float32 (16.8M params), JAX: "
               "jax.jit of stateless_apply, values donated (as Keras-JAX's fit), and "
               "optax donated; ms a step, ratio to Keras-JAX's Adam", results["a"])
        return
    results["a"], results["a_state"] = part_a(args.rounds, instances=args.instances,
                                              names=names)
    _table("(a) optimizer step alone, 16.8M float32 params, XLA; ratio to Adam "
           "(floor: ratio to the least step with skip; fast, slow: in the "
           "rounds of each state of the machine)", results["a"],
           keys=("ms", "ratio", "lo", "hi", "min", "max", "floor", "fast", "slow"))
    state = results["a_state"]
    print(f"the machine was in its fast state for {state['fast_share']:.0%} of "
          f"the rounds (Adam's step: {state['adam_ms_fast']:.1f} ms there, "
          f"{state['adam_ms_slow']:.1f} ms in the others)"
          if state["fast_share"] else "the machine stayed in one state (fast, slow: -)")


def _run_bc(args, results):
    bc = part_bc(args.repeats, with_callbacks="c" in args.parts)
    results["bc"] = bc
    _table("(b, c) fit step, 2x LSTM(256), 100x32 inputs, batch 64, XLA; ratio to Adam", bc)
    _table("(b) the optimizer's step alone on the model's variables: ms, and what "
           "it adds to Adam's as a fraction of Adam's fit step",
           {n: bc[n] for n in FIT_CONFIGS}, keys=("opt_ms", "opt_added"))
    if "c" not in args.parts:
        return
    for label in (MONITOR, LOGGER_100):
        row = bc[label]
        print(f"(c) {label}: {row['over_b']:+.3f} over GlobalNormClip alone "
              f"(95%: {row['over_b_lo']:+.3f} to {row['over_b_hi']:+.3f})")
    for label in (MONITOR, LOGGER_1, LOGGER_100):
        row = bc[label]
        print(f"(c) {label}: its on_train_batch_end takes {row['callback_ms']:.2f} ms "
              f"a batch, {row['callback_share']:+.4f} of Adam's fit step")


def _run_d(args, results):
    results["d"] = part_d()
    _table("(d) memory in the (a) loop, MB: optimizer state, a step's peak on top, process growth",
           results["d"], keys=("state_mb", "state_ratio", "step_peak_mb", "rss_mb"))


def _jit_key(jit_compile):
    return f"jit_compile={jit_compile}"


def _jit_of(table):
    """Whether an (e, f) table ran with `jit_compile=True` (see `_jit_key`)."""
    return table.endswith(_jit_key(True))


def _jit_label(backend, jit_compile):
    if backend == "jax":
        return ("jit on (jit_compile=True, jax.jit)" if jit_compile
                else "jit off (jit_compile=False: JAX eager, op by op)")
    return "XLA on (jit_compile=True)" if jit_compile else "XLA off (jit_compile=False)"


def _run_ef(args, results):
    import fit_parts

    labels = [*_configs(args.configs), FIT_FLOOR, FIT_FLOOR_AGC, ADAM_AGAIN]
    for part in ("e", "f"):
        if part in args.parts:
            results[part] = {}
    for model in args.models:
        spec = fit_parts.FIT_MODELS[model]
        for jit_compile in [j == "on" for j in args.jit_compile]:
            table = f"{model}, {_jit_key(jit_compile)}"
            steps, first = fit_parts.part_ef(
                spec, jit_compile, labels, args.fit_instances,
                args.fit_rounds if "e" in args.parts else 0, args.fit_steps,
                args.fit_protocol,
            )
            where = f"{spec.describe}; {_jit_label(args.backend, jit_compile)}"
            if "e" in args.parts:
                results["e"][table] = steps
                how = ("train_on_batch" if args.fit_protocol == "batch"
                       else "batch begin to next batch begin")
                _table(f"(e) fit step, {where}; ms a step ({how}), ratio to Adam's "
                       "in the same round", steps)
                _protocol_error(f"(e) {table}: a second Adam", steps[ADAM_AGAIN])
            if "f" in args.parts:
                results["f"][table] = first
                _table(f"(f) first fit call (trace, compile, first step), {where}; "
                       "seconds, ratio to Adam's first call (model by model)", first,
                       keys=("s", "ratio", "lo", "hi", "min", "max"))


def _run_g(args, results):
    import fit_parts

    g = results["g"] = fit_parts.part_g(args.callback_rounds, args.callback_steps)
    _table(f"(g) callbacks on a fast step: {fit_parts.FAST_MODEL.describe}; ms a step "
           "(batch begin to next batch begin, every callback included); added: fraction "
           "of the step without callbacks, [95%]; the callback's own "
           "on_train_batch_end: ms, and share of the step without callbacks",
           g, keys=("ms", "added", "added_lo", "added_hi", "own_ms", "own_share"))
    again = g[fit_parts.NO_CALLBACK_AGAIN]
    _protocol_error("(g) a second run without callbacks", {
        "ratio": 1 + again["added"], "lo": 1 + again["added_lo"], "hi": 1 + again["added_hi"],
    })


def _protocol_error(what, row, tolerance=0.02):
    """Prints how far a configuration timed twice reads from itself."""
    inside = "inside" if abs(row["ratio"] - 1) <= tolerance else "outside"
    print(f"{what} reads {row['ratio']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}] of the "
          f"first: the protocol's own error, {inside} 1.00 +- {tolerance:.2f}")


# How a target's row names what it bounds, where that is not the ratio to Adam.
KEY_LABELS = {"ratio": "", "of_least": " [of its least program]"}


def _print_verdicts(results):
    verdicts = _verdicts(results)
    if not verdicts:
        return
    print("\ntargets (median against the bound; 95% interval of the median)")
    for part, table, name, key, bound, value, lo, hi, verdict in verdicts:
        where = part if table is None else f"{part}: {table}"
        label = f"({where}) {name}" + KEY_LABELS.get(key, " [added]")
        added = results[part][name].get("opt_added") if part == "bc" and key == "ratio" else None
        share = "" if added is None else f"  (its optimizer step adds {added:+.4f})"
        notes = _notes(results, part, name) if key == "ratio" else ""
        print(f"{label:72s} {value:7.3f} <= {bound:.2f}?  "
              f"[{lo:.3f}, {hi:.3f}]  {verdict}{share}{notes}")
    results["targets"] = [
        dict(zip(("part", "table", "name", "key", "bound", "value", "lo", "hi", "verdict"), v))
        for v in verdicts
    ]


# The parts that run together, each group in a process of its own.
PART_GROUPS = {"a": _run_a, "bc": _run_bc, "d": _run_d, "ef": _run_ef, "g": _run_g}


def _run_groups(argv, args, results):
    """Runs each group of parts `args.parts` holds in a child process and
    merges its results: (a)'s optimizers and (e)'s models, in one process,
    outgrew this machine's 24 GB (TensorFlow keeps what it freed)."""
    # A child's `--parts` and `--json` come last: argparse keeps the last.
    argv = list(sys.argv[1:] if argv is None else argv)
    for group in PART_GROUPS:
        parts = [p for p in group if p in args.parts]
        if not parts:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv, "--parts", *parts,
                 "--part-child", "--json", out],
                check=True,
            )
            with open(out) as f:
                child = json.load(f)
        child.pop("machine")
        child.pop("targets", None)
        results.update(child)


def main(argv=None):
    args = _arguments(argv)
    if args.memory_child:
        _memory_child(args.memory_child)
        return 0
    # Keras reads its backend once, at its import.
    os.environ["KERAS_BACKEND"] = args.backend
    results = {"machine": _machine(args.backend)}
    if not args.part_child:
        print("machine:", results["machine"])
    groups = [g for g in PART_GROUPS if any(p in args.parts for p in g)]
    if len(groups) > 1 and not args.part_child:
        _run_groups(argv, args, results)
    else:
        for group in groups:
            PART_GROUPS[group](args, results)
    if not args.part_child:
        _print_verdicts(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.backend == "tensorflow" and not args.part_child:
        print("\nthe JAX parts run in a process of their own (Keras's backend is fixed "
              "at its import): python benchmarks/run.py --backend jax --parts a e f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
