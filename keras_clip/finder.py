"""The threshold finder: suggest a clipping threshold from measured gradients.

Like a learning-rate finder: run a few training steps, read the gradient norms
that the keras-clip step records anyway, and suggest a threshold from their
distribution, then put everything back as it was.
"""

import contextlib
import math
import sys

import keras
import numpy as np
from keras import ops

from keras_clip import _checks
from keras_clip import backend
from keras_clip.clippers import GlobalNormClip
from keras_clip.clippers import NormClip
from keras_clip.clippers import ValueClip
from keras_clip.optimizers import ClippingMixin
from keras_clip.optimizers import clipped

# The percentiles a report lists (100 is the largest norm).
PERCENTILES = (5, 25, 50, 75, 90, 95, 99, 100)
KINDS = ("global_norm", "norm", "value")
_CLIPPERS = {"global_norm": GlobalNormClip, "norm": NormClip, "value": ValueClip}
_KEYWORDS = ("clipper", "clipnorm", "clipvalue", "global_clipnorm")
_ROWS = 10  # variables listed by `str(report)`; the rest are counted


def suggest_threshold(
    model,
    data,
    steps=200,
    *,
    percentile=90.0,
    batch_size=None,
    shuffle=True,
    verbose="auto",
):
    """Suggests a gradient-clipping threshold from the model's own gradients.

    Runs `steps` training steps on `data` with the compiled model's loss and
    optimizer, records the gradient norms of every step (the global norm and
    each variable's, *before* clipping, read from the statistics a keras-clip
    step records; nothing is recomputed), then puts the model and the
    optimizer back exactly as they were, and suggests thresholds from the
    norms of the finite steps `s`:

    ```
    global_norm = P(||g_s||, percentile)                       # GlobalNormClip
    norm        = P(max_i ||g_s,i||, percentile)               # NormClip
    value       = P(max_i ||g_s,i|| / sqrt(n_i), percentile)   # ValueClip
    ```

    where `P` is NumPy's `percentile` (linear interpolation), `g_s,i` is the
    gradient of variable `i` (with `n_i` elements) on step `s`, and
    `||g_s||` the global norm. With the default `percentile=90`, the global
    and per-tensor suggestions clip the largest 10% of the measured steps,
    the spikes, and leave the others alone. (`NormClip` clips a step when
    its largest tensor norm exceeds the threshold, hence that statistic;
    pooling all tensors' norms would mix scales, a bias's with a kernel's,
    and clip the largest tensors on nearly every step. `report.per_variable`
    has each variable's own percentile.) A step records no per-element
    statistic, so the value threshold is derived from the norms: `||g|| /
    sqrt(n)` is the RMS element of a tensor, a lower bound of its largest
    `|g|` (and `||g||` an upper bound), so `ValueClip(value)` clips at least
    the largest 10% of the steps, and possibly many more; the report gives
    both bounds. Steps whose gradients hold a NaN or an Inf are left out of
    every percentile and counted.

    The steps are the ones the user's training would take: with a keras-clip
    optimizer, that optimizer as it is (its clipping included: the norms are
    recorded before it clips). With a plain Keras optimizer, a copy of it of
    class `keras_clip.clipped(type(optimizer))`, built from its config (its
    Keras `clipnorm`, `clipvalue` or `global_clipnorm`, if set, become the
    equivalent clipper) with its current variables (iterations, learning
    rate, slots) copied in; it skips a non-finite step instead of applying it
    (`nonfinite="skip"`), since an applied NaN makes every later norm NaN.
    A `LossScaleOptimizer` stays, around that copy if needed; a step it skips
    (a float16 overflow) records no norm, and neither does a step that only
    accumulates (`gradient_accumulation_steps`): `report.norms` can hold
    fewer than `steps` norms.

    Nothing of the run remains: every model variable (weights, non-trainable
    state, random seeds), every optimizer variable (slots, clipper state such
    as AutoClip's history, statistics counters, `iterations`) and every
    metric variable holds afterwards the exact value it held before, also when
    a step raises; `model.optimizer` is the same object and the model's train
    function is the one it had (a model or an optimizer that was not built is
    built first, as `fit` would build it). Only the data's own state moves (a
    `PyDataset` sees `on_epoch_end()` when it is cycled), and NumPy's global
    random generator, which shuffles the arrays.

    Limits: norms change as training goes on (they often shrink after the
    first epochs, and grow again for recurrent networks), so the suggestion
    fits the stage of training where it was measured. Take it as a starting
    point and measure again later, or let the threshold follow the run:
    `AutoClip(percentile=report.percentile)` clips to the same percentile of
    the run's own recent norms.

    Args:
        model: A compiled `keras.Model`.
        data: A tuple `(x, y)` or `(x, y, sample_weight)` of arrays (each a
            NumPy array or a tensor, or a list or dict of them, like `fit`'s
            `x`), a `tf.data.Dataset` or a `keras.utils.PyDataset` of such
            batches. Cycled if it has fewer than `steps` batches.
        steps: Int >= 1, the training steps to run (batches). Defaults to 200.
        percentile: Float in (0, 100], the percentile of the norms to suggest.
            Defaults to 90.0 (clips the largest 10% of the steps).
        batch_size: Int >= 1, the batch size for arrays; not for a dataset,
            which is batched already. Defaults to `None` (32 for arrays).
        shuffle: Bool: shuffle the arrays before each pass over them, as
            `fit` does. Defaults to `True`.
        verbose: `"auto"`, 0, 1 or 2: the progress bar (`keras.utils.Progbar`)
            with the last step's global norm; `"auto"` is 1. Defaults to
            `"auto"`.

    Returns:
        A `ThresholdReport`: the recorded norms, their percentiles, the
        suggested thresholds, the fraction of the steps each would have
        clipped, `plot()` and `optimizer()`.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    report = keras_clip.suggest_threshold(model, (x, y), steps=200)
    print(report)              # percentiles, suggestions, clip fractions
    report.suggested           # the global-norm threshold, e.g. 2.7
    report.plot()              # norms per step and their distribution
    model.compile(optimizer=report.optimizer(kind="global_norm"), loss="mse")
    model.fit(x, y)
    ```
    """
    _check_model(model)
    steps = _checks.number("steps", steps, low=1, low_open=False, integer=True)
    percentile = _checks.number(
        "percentile", percentile, low=0, high=100, what="a number in (0, 100]"
    )
    if not isinstance(shuffle, bool):
        raise TypeError(f"`shuffle` must be a bool. Received: shuffle={shuffle!r}")
    verbose = _check_verbose(verbose)
    batches = _batches(data, batch_size, shuffle)
    first = next(batches)  # fails here for a dataset that yields nothing

    user_optimizer = model.optimizer
    inner = _unwrap(user_optimizer)
    with _scope(model):
        if not model.built:
            model(first[0])
        if not user_optimizer.built:
            user_optimizer.build(model.trainable_variables)
    saved = _snapshot(model, user_optimizer)
    train_function = model.train_function
    swapped = not isinstance(inner, ClippingMixin)
    norms, by_variable = [], []
    try:
        if swapped:
            with _scope(model):
                optimizer = _measuring_copy(user_optimizer, model)
            model.optimizer = optimizer
            model.train_function = None  # the old one was traced with the old optimizer
        reader = _unwrap(model.optimizer)
        count = reader.gradient_stats()["steps"]
        progbar = keras.utils.Progbar(
            steps, verbose=verbose, stateful_metrics=["grad_norm"]
        )
        batch = first
        for step in range(steps):
            if step:
                batch = next(batches)
            model.train_on_batch(*batch)
            stats = reader.gradient_stats()
            if stats["steps"] != count:
                count = stats["steps"]
                norms.append(stats["grad_norm"])
                by_variable.append(reader.gradient_norms_by_variable())
            progbar.update(step + 1, [("grad_norm", stats["grad_norm"])])
    finally:
        if swapped:
            model.optimizer = user_optimizer
            model.train_function = train_function
        _restore(model, saved)

    paths = list(by_variable[0]) if by_variable else [
        v.path for v in model.trainable_variables
    ]
    sizes = {v.path: math.prod(v.shape) for v in model.trainable_variables}
    return ThresholdReport(
        norms=np.array(norms, "float64"),
        variable_norms=np.array(
            [list(row.values()) for row in by_variable], "float64"
        ).reshape(len(by_variable), len(paths)),
        variables=paths,
        variable_sizes=np.array([sizes[p] for p in paths], "int64"),
        steps=steps,
        percentile=percentile,
        optimizer_class=clipped(type(inner)),
        optimizer_config=inner.get_config(),
    )


class ThresholdReport:
    """The gradient norms `suggest_threshold` measured, and its suggestions.

    The thresholds are percentiles of the finite steps' norms (see
    `suggest_threshold` for the rules); each clip fraction is the exact share
    of the finite measured steps that the suggestion would have clipped,
    computed from the recorded norms:

    ```
    clip_fraction["global_norm"] = mean(||g_s|| > global_norm)
    clip_fraction["norm"]        = mean(max_i ||g_s,i|| > norm)
    clip_fraction["value"]       = (mean(max_i ||g_s,i|| / sqrt(n_i) > value),
                                    mean(max_i ||g_s,i|| > value))
    ```

    The value clip fraction is a `(lower, upper)` pair: which elements exceed
    the threshold is not known from norms, only that a step whose largest RMS
    element exceeds it is clipped and that a step whose largest norm does not
    is not.

    Attributes:
        steps: Int, the training steps run.
        norms: Float64 array `(m,)`: the global gradient norm (before
            clipping) of each recorded optimizer step, NaN or Inf where the
            gradients were not finite. `m == steps` unless steps were skipped
            by a `LossScaleOptimizer` or accumulated.
        variable_norms: Float64 array `(m, v)`: each variable's gradient norm
            (before clipping) on each recorded step.
        variables: The `v` variable paths, in the optimizer's order.
        variable_sizes: Int64 array `(v,)`: each variable's element count.
        finite: Bool array `(m,)`: which recorded steps were finite.
        nonfinite_steps: Int, the recorded steps that were not finite.
        percentile: Float, the percentile the suggestions use.
        percentiles: Dict `{5: ..., 25: ..., ..., 99: ..., 100: ...}` of the
            finite global norms (100 is the largest); empty if none was
            finite.
        suggestions: Dict `kind -> float or None` for `"global_norm"`,
            `"norm"` and `"value"` (`None` when no finite step was recorded
            or the percentile is 0: no positive threshold to suggest).
        suggested: `suggestions["global_norm"]`, the headline suggestion.
        per_variable: Dict `path -> float or None`: the percentile of each
            variable's own norms (for reading: `NormClip` takes one threshold
            for all tensors).
        clip_fraction: Dict `kind -> float` (for `"value"`, a `(lower,
            upper)` pair) of the finite steps each suggestion would have
            clipped; `None` where there is no suggestion.
    """

    def __init__(
        self,
        norms,
        variable_norms,
        variables,
        variable_sizes,
        steps,
        percentile,
        optimizer_class,
        optimizer_config,
    ):
        self.steps = steps
        self.norms = norms
        self.variable_norms = variable_norms
        self.variables = list(variables)
        self.variable_sizes = variable_sizes
        self.percentile = percentile
        self._optimizer_class = optimizer_class
        self._optimizer_config = optimizer_config
        self.finite = np.isfinite(norms)
        self.nonfinite_steps = int(np.sum(~self.finite))
        good = norms[self.finite]
        per_variable = variable_norms[self.finite]
        # The statistic each suggestion is a percentile of, one per step.
        statistic = {
            "global_norm": good,
            "norm": per_variable.max(axis=1, initial=0.0),
            "value": (per_variable / np.sqrt(variable_sizes)).max(
                axis=1, initial=0.0
            ),
        }
        self.percentiles = (
            {p: float(np.percentile(good, p)) for p in PERCENTILES}
            if good.size else {}
        )
        self.suggestions = {
            kind: _positive(values, percentile) for kind, values in statistic.items()
        }
        self.suggested = self.suggestions["global_norm"]
        self.per_variable = {
            path: _positive(per_variable[:, i], percentile)
            for i, path in enumerate(self.variables)
        }
        self.clip_fraction = {}
        for kind, threshold in self.suggestions.items():
            if threshold is None:
                self.clip_fraction[kind] = None
            elif kind == "value":
                self.clip_fraction[kind] = (
                    float(np.mean(statistic["value"] > threshold)),
                    float(np.mean(statistic["norm"] > threshold)),
                )
            else:
                self.clip_fraction[kind] = float(np.mean(statistic[kind] > threshold))

    def clipper(self, kind="global_norm"):
        """The clipper with the suggested threshold.

        Args:
            kind: `"global_norm"` (`GlobalNormClip`), `"norm"` (`NormClip`) or
                `"value"` (`ValueClip`). Defaults to `"global_norm"`.

        Returns:
            A new clipper.
        """
        kind = _checks.choice("kind", kind, KINDS)
        threshold = self.suggestions[kind]
        if threshold is None:
            raise ValueError(
                f"There is no {kind} suggestion: {self._why_none()} "
                f"Received: kind={kind!r}"
            )
        return _CLIPPERS[kind](threshold)

    def optimizer(self, kind="global_norm", **kwargs):
        """A new keras-clip optimizer with the suggested clipper.

        Of the measured optimizer's class (its `Clipped*` class for a plain
        Keras optimizer), from its config as it was, with `kwargs` on top and
        the clipper of `clipper(kind)`. Its state is fresh (no slots, no
        steps).

        Args:
            kind: `"global_norm"`, `"norm"` or `"value"`. Defaults to
                `"global_norm"`.
            **kwargs: Arguments of the optimizer class (e.g.
                `learning_rate=1e-4`), over the measured optimizer's config.

        Returns:
            The optimizer, e.g. `ClippedAdam(..., clipper=GlobalNormClip(t))`.
        """
        given = [k for k in _KEYWORDS if k in kwargs]
        if given:
            raise ValueError(
                "`report.optimizer()` sets the clipper from the suggestion; "
                f"choose it with `kind`. Received: {given[0]}={kwargs[given[0]]!r}"
            )
        config = dict(self._optimizer_config)
        config.update(dict.fromkeys(_KEYWORDS), **kwargs)
        config["clipper"] = self.clipper(kind)
        return self._optimizer_class.from_config(config)

    def plot(self):
        """Plots the norms per step and their distribution, with the suggestion.

        Left: the global norm of each recorded step (log scale), non-finite
        steps marked at the top. Right: the histogram of the finite norms
        (log-spaced bins). Both mark the suggested global-norm threshold.

        Returns:
            A `matplotlib.figure.Figure`.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib import pyplot as plt
        except ImportError as err:
            raise ImportError(
                "`ThresholdReport.plot()` needs matplotlib: "
                "`pip install matplotlib` (or `pip install keras-clip[plot]`)."
            ) from err
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        step = np.arange(1, self.norms.size + 1)
        good = self.norms[self.finite]
        positive = good[good > 0]
        left.plot(step[self.finite], self.norms[self.finite], ".-", lw=0.8, ms=3,
                  label="global norm (before clipping)")
        if self.nonfinite_steps:
            top = positive.max() if positive.size else 1.0
            left.plot(step[~self.finite], np.full(self.nonfinite_steps, top), "x",
                      color="tab:red", label=f"non-finite ({self.nonfinite_steps})")
        if positive.size:
            left.set_yscale("log")
            bins = np.geomspace(positive.min(), positive.max() * (1 + 1e-9), 40)
            right.hist(positive, bins=bins, color="tab:blue", alpha=0.8)
            right.set_xscale("log")
        if self.suggested is not None:
            label = (
                f"suggested {self.suggested:.4g} ({self.percentile:g}th "
                f"percentile, clips {self.clip_fraction['global_norm']:.0%})"
            )
            left.axhline(self.suggested, color="tab:orange", ls="--", label=label)
            right.axvline(self.suggested, color="tab:orange", ls="--", label=label)
            right.legend(loc="upper left", fontsize="small")
        else:
            left.set_title(self._why_none(), fontsize="small")
        left.set_xlabel("step")
        left.set_ylabel("global gradient norm")
        left.legend(loc="best", fontsize="small")
        right.set_xlabel("global gradient norm")
        right.set_ylabel("steps")
        fig.tight_layout()
        return fig

    def _why_none(self):
        m = self.norms.size
        if m == 0:
            return (
                f"no optimizer step was recorded in {self.steps} training "
                "steps (all skipped by the LossScaleOptimizer, or accumulated)."
            )
        if self.nonfinite_steps == m:
            return (
                f"all {m} steps had non-finite gradients (NaN or Inf); no "
                "threshold can be suggested, and clipping cannot repair a "
                "NaN: check the data, the loss and the initial weights."
            )
        return (
            f"the {self.percentile:g}th percentile of the norms is 0 (the "
            "gradients are zero); there is nothing to clip."
        )

    def __repr__(self):
        value = "None" if self.suggested is None else f"{self.suggested:.4g}"
        return (
            f"<ThresholdReport steps={self.steps} recorded={self.norms.size} "
            f"nonfinite={self.nonfinite_steps} suggested={value}>"
        )

    def __str__(self):
        m, bad = self.norms.size, self.nonfinite_steps
        lines = [
            f"Gradient norms (before clipping) of {m} optimizer steps"
            + (f" in {self.steps} training steps" if m != self.steps else "")
            + (f"; {bad} non-finite, left out" if bad else "")
            + "."
        ]
        if self.percentiles:
            head = ["percentile"] + [
                "max" if p == 100 else str(p) for p in self.percentiles
            ]
            row = ["global norm"] + [f"{v:.4g}" for v in self.percentiles.values()]
            lines += _table([head, row], indent="  ")
        if self.suggested is None:
            lines.append(f"No suggestion: {self._why_none()}")
            return "\n".join(lines)
        p = f"{self.percentile:g}th percentile"
        lines.append(f"Suggested thresholds ({p} of each step's statistic):")
        rows = []
        for kind, what in (
            ("global_norm", "global norm"),
            ("norm", "largest tensor norm"),
            ("value", "largest RMS element"),
        ):
            threshold, share = self.suggestions[kind], self.clip_fraction[kind]
            if threshold is None:
                rows.append([_CLIPPERS[kind].__name__, what, "no suggestion"])
                continue
            if kind == "value" and f"{share[0]:.0%}" != f"{share[1]:.0%}":
                clips = f"clips {share[0]:.0%} to {share[1]:.0%} of the steps"
            elif kind == "value":
                clips = f"clips {share[0]:.0%} of the steps"
            else:
                clips = f"clips {share:.0%} of the steps"
            rows.append(
                [f"{_CLIPPERS[kind].__name__}({threshold:.4g})", what, clips]
            )
        lines += _table(rows, indent="  ")
        lines.append(f"Per variable ({p} of its norm):")
        items = list(self.per_variable.items())
        rows = [
            [path, "-" if value is None else f"{value:.4g}"]
            for path, value in items[:_ROWS]
        ]
        lines += _table(rows, indent="  ")
        if len(items) > _ROWS:
            lines.append(f"  ... and {len(items) - _ROWS} more (report.per_variable)")
        lines.append(
            "The value threshold is estimated from the norms (the RMS element is "
            "a lower bound of the largest |g|)."
        )
        lines.append(
            "Norms change as training goes on: measure again later, or use "
            f"AutoClip(percentile={self.percentile:g}) to follow the run."
        )
        return "\n".join(lines)


def _positive(values, percentile):
    """The percentile of `values` if positive, else None (no usable threshold)."""
    if not values.size:
        return None
    value = float(np.percentile(values, percentile))
    return value if value > 0 else None


def _table(rows, indent=""):
    """Rows of strings (all of one length) as aligned lines."""
    widths = [max(map(len, column)) for column in zip(*rows)]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows
    ]


# Arguments.


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError(
            "The model must be compiled with a loss and an optimizer first: "
            "`model.compile(optimizer=..., loss=...)`. "
            f"Received: model={model!r}"
        )
    _unwrap(model.optimizer)


def _unwrap(optimizer):
    """The optimizer inside any `LossScaleOptimizer`."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, backend.keras_optimizers("MultiOptimizer")):
        raise TypeError(
            "`suggest_threshold` does not support `MultiOptimizer`: it updates "
            "the variables outside the step that records the gradient norms. "
            f"Received: model.optimizer={optimizer!r}"
        )
    return optimizer


def _check_verbose(verbose):
    if verbose == "auto" and isinstance(verbose, str):
        return 1
    if verbose in (0, 1, 2) and not isinstance(verbose, (bool, str)):
        return int(verbose)
    raise ValueError(
        f'`verbose` must be "auto", 0, 1 or 2. Received: verbose={verbose!r}'
    )


def _batches(data, batch_size, shuffle):
    """An endless iterator of `(x, y, sample_weight)` batches, cycling `data`."""
    kind = _data_kind(data)
    if kind != "arrays":
        if batch_size is not None:
            raise ValueError(
                "`batch_size` is for arrays: a dataset is batched already. "
                f"Received: batch_size={batch_size!r}"
            )
        return _cycle(data, kind)
    batch_size = 32 if batch_size is None else _checks.number(
        "batch_size", batch_size, low=1, low_open=False, integer=True
    )
    if len(data) not in (2, 3):
        raise ValueError(
            "`data` as a tuple must be `(x, y)` or `(x, y, sample_weight)`. "
            f"Received: data=a tuple of {len(data)} elements"
        )
    arrays = keras.tree.map_structure(np.asarray, tuple(data))
    lengths = {
        a.shape[0] if a.ndim else None
        for a in keras.tree.flatten(arrays)
    }
    if None in lengths or len(lengths) != 1:
        raise ValueError(
            "The arrays of `data` must all have the same number of samples "
            "(first dimension). Received: data=arrays with first dimensions "
            f"{sorted(lengths, key=str)}"
        )
    (count,) = lengths
    if count == 0:
        raise ValueError("`data` holds no sample. Received: data=empty arrays")
    return _array_batches(arrays, count, batch_size, shuffle)


def _data_kind(data):
    if isinstance(data, keras.utils.PyDataset):
        return "pydataset"
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(data, tf.data.Dataset):
        return "dataset"
    if isinstance(data, (tuple, list)) and data:
        return "arrays"
    raise TypeError(
        "`data` must be a tuple `(x, y)` of arrays, a `tf.data.Dataset` or a "
        f"`keras.utils.PyDataset`. Received: data={_short(data)}"
    )


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _array_batches(arrays, count, batch_size, shuffle):
    while True:
        order = np.random.permutation(count) if shuffle else np.arange(count)
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            yield _triple(keras.tree.map_structure(lambda a: a[index], arrays))


def _cycle(data, kind):
    while True:
        seen = 0
        if kind == "dataset":
            elements = iter(data)
        else:
            total = data.num_batches
            elements = (data[i] for i in (range(total) if total else _count()))
        for batch in elements:
            seen += 1
            yield _triple(batch)
        if not seen:
            raise ValueError(f"`data` yielded no batch. Received: data={_short(data)}")
        if kind == "pydataset":
            data.on_epoch_end()


def _count():
    i = 0
    while True:
        yield i
        i += 1


def _triple(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "Each batch of `data` must be `(x, y)` or `(x, y, sample_weight)`. "
            f"Received: batch={_short(batch)}"
        )
    if keras.backend.backend() != "tensorflow":  # e.g. tf.data under JAX
        batch = keras.tree.map_structure(np.asarray, tuple(batch))
    x, y, *weight = batch
    return x, y, (weight[0] if weight else None)


# State: snapshot, measuring copy, restore.


def _scope(model):
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _all_variables(model, optimizer):
    out, seen = [], set()
    for v in [*model.variables, *model.metrics_variables, *optimizer.variables]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _snapshot(model, optimizer):
    return [
        (v, np.array(ops.convert_to_numpy(v.value), copy=True))
        for v in _all_variables(model, optimizer)
    ]


def _restore(model, saved):
    # Metrics that the steps built start from their initial state; all the
    # others get their saved value back.
    model.reset_metrics()
    for variable, value in saved:
        variable.assign(value)


def _measuring_copy(optimizer, model):
    """A keras-clip copy of a plain optimizer, with its variables copied in."""
    copy = _unbuilt_copy(optimizer)
    copy.build(model.trainable_variables)
    old, new = optimizer.variables, copy.variables
    for source, target in zip(old, new[:len(old)]):
        if (
            source.name != target.name
            or tuple(source.shape) != tuple(target.shape)
            or source.dtype != target.dtype
        ):
            raise RuntimeError(
                "keras-clip could not copy the state of "
                f"{type(optimizer).__name__} into {type(copy).__name__}: "
                f"variable {source.path} does not match {target.path}."
            )
        target.assign(source.value)
    return copy


def _unbuilt_copy(optimizer):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(
            _unbuilt_copy(optimizer.inner_optimizer),
            initial_scale=optimizer.initial_scale,
            dynamic_growth_steps=optimizer.dynamic_growth_steps,
        )
    config = dict(optimizer.get_config(), nonfinite="skip")
    return clipped(type(optimizer)).from_config(config)
