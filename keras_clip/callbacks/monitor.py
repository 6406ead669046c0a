"""`GradientMonitor`: the optimizer's gradient statistics in `logs`, with alarms.

The monitor only reads: a keras-clip optimizer records its statistics inside
the compiled step (`keras_clip/stats.py`), and the monitor reads them once per
batch end: one host read of the readout the step writes for it, or, with
more steps per execution than the readout keeps,
`opt.gradient_stats(reset_window=True)`. It never recomputes a gradient and
never touches the data.
"""

import collections
import logging
import math
import statistics
import warnings

import keras
from keras import ops

from keras_clip import _checks
from keras_clip import backend
from keras_clip.optimizers import BUILTIN
from keras_clip.optimizers import ClippingMixin
from keras_clip.stats import RING

# Names the monitor can add to `logs`, in the order it adds them.
STATS = (
    "grad_norm",
    "grad_norm_max",
    "clipped_grad_norm",
    "clip_rate",
    "nonfinite_steps",
    "clip_threshold",
    "loss_scale",
)
DEFAULT_STATS = ("grad_norm", "grad_norm_max", "clipped_grad_norm", "clip_rate")
ACTIONS = ("warn", "stop", "raise")
KINDS = ("nonfinite", "stall", "explode", "vanish")
# The explode check reads the log10 of the mean norms of this many recent
# batches (executions, with `steps_per_execution > 1`) ...
RECENT_BATCHES = 50
# ... and fires this many robust standard deviations above their median
# (when that is more than `explode_factor`).
SPREADS = 6.0

GradientEvent = collections.namedtuple("GradientEvent", ["step", "kind", "value"])
GradientEvent.__doc__ = """An alarm raised by `GradientMonitor`.

Fields:
    step: The optimizer's `iterations` after the step that raised it (the
        first step is step 1; with `steps_per_execution > 1`, the last step
        of the execution in which it happened).
    kind: `"nonfinite"`, `"stall"`, `"explode"` or `"vanish"`.
    value: The global gradient norm that raised it (for `"explode"` the
        largest norm of the execution; for `"nonfinite"` the last step's norm,
        NaN when that step itself was finite); for `"stall"`, the number of
        consecutive non-finite steps counted.
"""


class GradientAlarmError(RuntimeError):
    """Raised by `GradientMonitor` for an alarm whose action is `"raise"`."""


_logger = logging.getLogger("keras_clip")


@keras.saving.register_keras_serializable(package="keras_clip")
class GradientMonitor(keras.callbacks.Callback):
    """Puts the optimizer's gradient statistics into `logs`, with alarms.

    At the end of each batch and epoch the monitor adds the statistics that a
    keras-clip optimizer recorded inside its step to the `logs` that Keras
    callbacks share, so they show in the progress bar, in
    `History.history`, in `CSVLogger` files and in `TensorBoard` scalars
    (for callbacks listed after the monitor; `History` and the progress bar
    always come after it). It reads only: it never recomputes gradients.

    Epoch values aggregate the epoch's steps, and batch values the epoch's
    steps so far (like Keras's `loss`):

    ```
    grad_norm         = mean of the finite steps' global norms (before clipping)
    grad_norm_max     = max of the finite steps' global norms
    clipped_grad_norm = mean of the applied gradient's global norm
    clip_rate         = clipped steps / steps
    nonfinite_steps   = steps whose gradient held a NaN or an Inf
    clip_threshold    = the threshold on the last step
    loss_scale        = the `LossScaleOptimizer`'s scale (if there is one)
    ```

    `grad_norm`, `grad_norm_max`, `clip_rate` and `nonfinite_steps` count
    every step, also with `steps_per_execution > 1` (the optimizer accumulates
    them inside the step). `clipped_grad_norm` and the per-layer norms are
    kept for the last step only, so with `steps_per_execution > 1` they are
    means over the last step of each execution.

    Alarms, checked at the end of each batch:

    ```
    nonfinite: a step's gradient held a NaN or an Inf
    stall:     the last `stall_steps` steps all held a NaN or an Inf
    explode:   max norm > typical * max(explode_factor, 10 ** (6 * spread))
    vanish:    norm < vanish_threshold for `patience` consecutive steps
    ```

    A stall means nothing is being learned: with the default
    `nonfinite="skip"` the weights stay as they are, and the loss may stay
    finite, so `keras.callbacks.TerminateOnNaN` never fires. With
    `steps_per_execution > 1`, an execution in which only some steps were
    non-finite restarts the count at 1 if its last step was non-finite, else
    at 0 (the monitor sees counts per execution, not the order of the steps
    within one), so the count may fall short of the true run by up to
    `steps_per_execution - 1` steps.

    The explode check compares with the last 50 batches (executions, with
    `steps_per_execution > 1`), on a log scale, where `n` are their mean
    norms:

    ```
    typical = 10 ** median(log10(n))
    spread  = 1.4826 * median(|log10(n) - median(log10(n))|)
    ```

    `spread` is a robust standard deviation of `log10(n)` (the median
    absolute deviation, scaled to a normal's). Medians are not dragged up by
    the spike they have to detect; a recent window follows a norm that drifts
    as training goes on (a recurrent network's can grow several-fold over a
    few epochs of healthy training); and where the norms are noisy, a spike
    must stand out of their spread, not only exceed `explode_factor` times
    the typical norm. Both are updated after the check, which starts after
    `warmup_steps` finite steps.

    An alarm fires once when its condition starts and again only after the
    condition has cleared; every alarm is recorded in `events`, whatever its
    action. `"warn"` prints the alarm on a line of its own, the way Keras's
    callbacks print (to stdout, or to the `"keras_clip"` logger when
    interactive logging is off: `keras.config.disable_interactive_logging()`).
    Steps that a `LossScaleOptimizer` skips (float16 overflow) never reach
    the inner optimizer and raise no alarm.

    The loss Keras logs: with `nonfinite="skip"` (or `"zero"`), a batch whose
    loss is NaN or Inf trains nothing, but Keras's running mean of the loss
    would stay NaN for the rest of the epoch, and `History`, the progress
    bar, `TerminateOnNaN`, `EarlyStopping` and `ReduceLROnPlateau` would act
    on that. The monitor makes the logged `loss` the mean over the batches
    whose loss is finite (for every callback, whatever their order), and NaN
    only while the epoch has had no such batch yet. A batch whose loss is
    finite counts, even if its step was skipped for a non-finite gradient:
    that loss is a true measurement. With `nonfinite="propagate"` the loss
    is left as Keras logs it.

    Use one monitor per model: it starts a new statistics window at every
    batch end.

    Args:
        stats: The statistics to add to `logs`, from `"grad_norm"`,
            `"grad_norm_max"`, `"clipped_grad_norm"`, `"clip_rate"`,
            `"nonfinite_steps"`, `"clip_threshold"` and `"loss_scale"` (left
            out when no `LossScaleOptimizer` wraps the optimizer). Defaults to
            `("grad_norm", "grad_norm_max", "clipped_grad_norm", "clip_rate")`.
        per_layer: Bool: also record each layer's gradient norm (the global
            norm of that layer's gradients, before clipping), per epoch, in
            `History.history["grad_norm/<layer name>"]`, not in the progress
            bar. Defaults to `False`.
        explode_factor: Float > 1: the least multiple of the typical norm
            that is exploding (where the recent norms are noisy, a spike
            must also be 6 spreads above the typical norm). Defaults to 10.0.
        warmup_steps: Int >= 0: finite steps seen before the explode check
            starts. Defaults to 10.
        vanish_threshold: Positive float: a global norm below it is
            vanishing. Defaults to 1e-7.
        patience: Int >= 1: consecutive vanishing steps before the vanish
            alarm fires. Defaults to 10.
        stall_steps: Int >= 1: consecutive non-finite steps before the
            stall alarm fires. Defaults to 10.
        on_nonfinite: What a non-finite gradient does: `"warn"` (prints a
            line naming the step, the norm and the typical norm), `"stop"`
            (prints it and sets `model.stop_training`, so training ends
            after this batch, like `keras.callbacks.TerminateOnNaN`),
            `"raise"` (a `GradientAlarmError`) or `None` (recorded in
            `events` only). Defaults to `"warn"`.
        on_stall: The same, for a stall. Defaults to `"warn"`.
        on_explode: The same, for an exploding gradient. Defaults to `"warn"`.
        on_vanish: The same, for a vanishing gradient. Defaults to `"warn"`.
        filter_nonfinite_loss: Bool: leave batches whose loss is not finite
            out of the loss Keras logs (see above). Defaults to `True`.

    Attributes:
        events: The alarms so far, a list of `GradientEvent(step, kind,
            value)`.

    Example:

    >>> monitor = GradientMonitor(per_layer=True, on_explode="stop")
    >>> monitor.stats
    ('grad_norm', 'grad_norm_max', 'clipped_grad_norm', 'clip_rate')

    Then, with a model compiled with a keras-clip optimizer:

    ```python
    model.compile(optimizer=ClippedAdam(global_clipnorm=1.0), loss="mse")
    history = model.fit(x, y, callbacks=[monitor])
    history.history["grad_norm"], history.history["grad_norm/dense"]
    monitor.events  # [GradientEvent(step=..., kind="explode", value=...)]
    ```
    """

    def __init__(
        self,
        stats=DEFAULT_STATS,
        per_layer=False,
        explode_factor=10.0,
        warmup_steps=10,
        vanish_threshold=1e-7,
        patience=10,
        stall_steps=10,
        on_nonfinite="warn",
        on_stall="warn",
        on_explode="warn",
        on_vanish="warn",
        filter_nonfinite_loss=True,
    ):
        super().__init__()
        self.stats = _check_stats(stats)
        if not isinstance(filter_nonfinite_loss, bool):
            raise TypeError(
                "`filter_nonfinite_loss` must be a bool. "
                f"Received: filter_nonfinite_loss={filter_nonfinite_loss!r}"
            )
        self.filter_nonfinite_loss = filter_nonfinite_loss
        if not isinstance(per_layer, bool):
            raise TypeError(
                f"`per_layer` must be a bool. Received: per_layer={per_layer!r}"
            )
        self.per_layer = per_layer
        self.explode_factor = _checks.number(
            "explode_factor", explode_factor, low=1.0
        )
        self.warmup_steps = _checks.number(
            "warmup_steps", warmup_steps, low=0, low_open=False, integer=True
        )
        self.vanish_threshold = _checks.number(
            "vanish_threshold", vanish_threshold, low=0.0
        )
        self.patience = _checks.number(
            "patience", patience, low=1, low_open=False, integer=True
        )
        self.stall_steps = _checks.number(
            "stall_steps", stall_steps, low=1, low_open=False, integer=True
        )
        self.on_nonfinite = _check_action("on_nonfinite", on_nonfinite)
        self.on_stall = _check_action("on_stall", on_stall)
        self.on_explode = _check_action("on_explode", on_explode)
        self.on_vanish = _check_action("on_vanish", on_vanish)
        self.events = []
        self._optimizer = None
        self._alarm_state()

    def _alarm_state(self):
        self._log_norms = collections.deque(maxlen=RECENT_BATCHES)
        self._seen = 0  # finite steps seen, for the warmup
        self._low = 0  # consecutive steps below `vanish_threshold`
        self._nonfinite_run = 0  # consecutive non-finite steps
        self._active = dict.fromkeys(KINDS, False)

    # Callback hooks.

    def set_model(self, model):
        super().set_model(model)
        # Before `fit` makes its train function, which must hold the filter.
        optimizer = _inner(getattr(model, "optimizer", None))
        if (
            self.filter_nonfinite_loss
            and isinstance(optimizer, ClippingMixin)
            and optimizer.nonfinite != "propagate"
        ):
            backend.filter_nonfinite_loss(model)

    def on_train_begin(self, logs=None):
        optimizer, self._loss_scaler = _unwrap(self.model.optimizer)
        if optimizer is not self._optimizer:
            self._optimizer = optimizer
            self._alarm_state()
        self._layer_of = _layer_names(self.model) if self.per_layer else {}
        self._layer_names = []
        # Counters as of now; drop a window left by steps before this fit.
        self._last = _read(optimizer, reset_window=True)
        self._epoch = _Epoch(self._last)
        # Each batch reads the step's readout, while it holds every update
        # since the last read.
        self._reads_readout = (getattr(self.model, "steps_per_execution", 1) or 1) <= RING
        if self._reads_readout and optimizer._keep_readout():
            self.model.make_train_function(force=True)  # the step writes it

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = _Epoch(self._last)

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 (on JAX, Keras's `model` property brings the step's state back)
        stats = self._read_batch()
        last, self._last = self._last, stats
        new_steps = stats["steps"] - last["steps"]
        sampled = new_steps > 0 and math.isfinite(stats["grad_norm"])
        layers = self._layer_norms() if sampled and self.per_layer else None
        self._epoch.add(stats, sampled, layers)
        if logs is not None:
            logs.update(self._values())
        fired = self._check(stats, last)
        self._act(fired)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._values())
        if not self.per_layer:
            return
        history = getattr(self.model, "history", None)
        if isinstance(history, keras.callbacks.History):
            layers = self._epoch.layer_means(self._layer_names)
            for name, value in layers.items():
                history.history.setdefault(f"grad_norm/{name}", []).append(value)

    # Reading.

    def _read_batch(self):
        """The statistics after this batch, the window its updates."""
        optimizer = self._optimizer
        if not self._reads_readout:
            return _read(optimizer, reset_window=True)
        read = optimizer._stats_since(self._last)
        if read is None:  # no update since the last reset: the window is exact
            return _read(optimizer, reset_window=True)
        out, complete = read
        if not complete:
            self._reads_readout = False
            _read(optimizer, reset_window=True)  # windows from the next batch on
            warnings.warn(
                f"GradientMonitor: {out['steps'] - self._last['steps']} updates "
                f"in one batch, more than the {RING} whose norms the "
                "step keeps for a read: this batch's `grad_norm` and "
                f"`grad_norm_max` count its last {RING}. From the next "
                "batch on, every update counts.",
                stacklevel=2,
            )
        return out

    def _values(self):
        """The requested statistics, aggregated over the epoch so far."""
        e, now = self._epoch, self._last
        steps = now["steps"] - e.start["steps"]
        clipped = now["clipped_steps"] - e.start["clipped_steps"]
        values = {
            "grad_norm": e.norm_sum / e.finite if e.finite else math.nan,
            "grad_norm_max": e.norm_max if e.finite else math.nan,
            "clipped_grad_norm": (
                e.clipped_sum / e.samples if e.samples else math.nan
            ),
            "clip_rate": clipped / steps if steps else 0.0,
            "nonfinite_steps": now["nonfinite_steps"]
            - e.start["nonfinite_steps"],
            "clip_threshold": now["clip_threshold"],
        }
        if self._loss_scaler is not None:
            values["loss_scale"] = _loss_scale(self._loss_scaler)
        return {k: values[k] for k in self.stats if k in values}

    def _layer_norms(self):
        squares = {}
        for path, norm in self._optimizer.gradient_norms_by_variable().items():
            layer = self._layer_of.get(path) or path.rpartition("/")[0] or path
            squares[layer] = squares.get(layer, 0.0) + norm * norm
        for layer in squares:
            if layer not in self._layer_names:
                self._layer_names.append(layer)
        return {k: math.sqrt(v) for k, v in squares.items()}

    # Alarms.

    def _typical(self):
        """`(typical, spread)` of the recent norms (`None` before any)."""
        if not self._log_norms:
            return None, None
        # (`statistics`, not NumPy: on 50 numbers, each batch, 10x faster.)
        center = statistics.median(self._log_norms)
        spread = 1.4826 * statistics.median([abs(x - center) for x in self._log_norms])
        return float(10.0**center), float(spread)

    def _check(self, stats, last):
        """The alarms that fire on this batch, as `(kind, message)` pairs.

        Records them in `events` and updates the alarm state (the recent
        norms after the explode check).
        """
        step = stats["iterations"]
        span = step - last["iterations"]
        where = f"step {step}" if span <= 1 else f"steps {step - span + 1}-{step}"
        n = stats["window_steps"]
        norm_max = stats["window_norm_max"]
        typical, spread = self._typical()
        typ = "not known yet" if typical is None else f"{typical:.4g}"
        fired = []

        def fire(kind, value, message):
            self.events.append(GradientEvent(step, kind, value))
            fired.append((kind, f"GradientMonitor: {message}"))

        new_steps = stats["steps"] - last["steps"]
        nonfinite = stats["nonfinite_steps"] - last["nonfinite_steps"]
        last_nonfinite = not math.isfinite(stats["grad_norm"])
        if nonfinite and not self._active["nonfinite"]:
            # The last step's norm, if that step is the non-finite one.
            value = stats["grad_norm"] if last_nonfinite else math.nan
            what = "gradient" if nonfinite == 1 else f"gradient on {nonfinite} steps"
            norm = f" (global norm {value})" if last_nonfinite else ""
            policy = _POLICY.get(self._optimizer.nonfinite, "")
            fire(
                "nonfinite",
                value,
                f"non-finite {what} (NaN or Inf) at {where}{norm}; typical "
                f"norm {typ}. {policy}",
            )
        if new_steps:
            self._active["nonfinite"] = bool(nonfinite)
            # A run of non-finite steps goes on through an execution whose
            # steps were all non-finite; else it restarts at its last step.
            if nonfinite == new_steps:
                self._nonfinite_run += new_steps
            else:
                self._nonfinite_run = int(last_nonfinite)
        run = self._nonfinite_run
        stalled = run >= self.stall_steps
        if stalled and not self._active["stall"]:
            per_update = self._optimizer.gradient_accumulation_steps or 1
            since = step - run * per_update
            fire("stall", run, _stall_message(
                where, run, since, self._optimizer.nonfinite
            ))
        self._active["stall"] = stalled
        if not n:
            return fired

        spike = False
        if typical is not None and self._seen >= self.warmup_steps:
            limit = max(self.explode_factor, 10.0 ** (SPREADS * spread))
            spike = norm_max > limit * typical
        if spike and not self._active["explode"]:
            fire(
                "explode",
                norm_max,
                f"exploding gradient at {where}: global norm {norm_max:.4g} is "
                f"{norm_max / typical:.3g}x the typical norm {typ}; the limit "
                f"is {limit:.3g}x (explode_factor={self.explode_factor:g}, or "
                f"{SPREADS:g} spreads where the recent norms are noisy).",
            )
        self._active["explode"] = spike

        if norm_max < self.vanish_threshold:
            self._low += n
        else:  # some step of the window was above; was the last one?
            self._low = int(stats["grad_norm"] < self.vanish_threshold)
        vanishing = self._low >= self.patience
        if vanishing and not self._active["vanish"]:
            value = stats["grad_norm"]
            fire(
                "vanish",
                value,
                f"vanishing gradient at {where}: global norm {value:.4g} has "
                f"been below vanish_threshold={self.vanish_threshold:g} for "
                f"{self._low} consecutive steps (patience={self.patience}); "
                f"typical norm {typ}.",
            )
        self._active["vanish"] = vanishing

        mean = stats["window_norm_sum"] / n
        if mean > 0:  # an all-zero gradient has no scale to learn from
            self._log_norms.append(math.log10(mean))
        self._seen += n
        return fired

    def _act(self, fired):
        error = None
        for kind, message in fired:
            action = getattr(self, f"on_{kind}")
            if action == "warn":
                _print(message)
            elif action == "stop":
                self.model.stop_training = True
                _print(f"{message} Stopping training.")
            elif action == "raise" and error is None:
                error = GradientAlarmError(message)
        if error is not None:
            raise error

    # Serialization.

    def get_config(self):
        return {
            "stats": list(self.stats),
            "per_layer": self.per_layer,
            "explode_factor": self.explode_factor,
            "warmup_steps": self.warmup_steps,
            "vanish_threshold": self.vanish_threshold,
            "patience": self.patience,
            "stall_steps": self.stall_steps,
            "on_nonfinite": self.on_nonfinite,
            "on_stall": self.on_stall,
            "on_explode": self.on_explode,
            "on_vanish": self.on_vanish,
            "filter_nonfinite_loss": self.filter_nonfinite_loss,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _Epoch:
    """Sums over the epoch's batches (Python numbers, host side)."""

    def __init__(self, start):
        self.start = start  # cumulative counters at the start of the epoch
        self.finite = 0
        self.norm_sum = 0.0
        self.norm_max = 0.0
        self.samples = 0  # last-step samples, for what has no window
        self.clipped_sum = 0.0
        self.layer_sums = {}
        self.layer_samples = 0

    def add(self, stats, sampled, layers):
        self.finite += stats["window_steps"]
        self.norm_sum += stats["window_norm_sum"]
        if stats["window_steps"]:
            self.norm_max = max(self.norm_max, stats["window_norm_max"])
        if sampled:
            self.samples += 1
            self.clipped_sum += stats["clipped_grad_norm"]
        if layers is not None:
            self.layer_samples += 1
            for name, value in layers.items():
                self.layer_sums[name] = self.layer_sums.get(name, 0.0) + value

    def layer_means(self, names):
        n = self.layer_samples
        return {
            name: self.layer_sums.get(name, 0.0) / n if n else math.nan
            for name in names
        }


_POLICY = {
    "skip": "The update was skipped (nonfinite='skip'): no weight changed.",
    "zero": "A zero gradient was applied instead (nonfinite='zero').",
    "propagate": (
        "It was applied (nonfinite='propagate'): the weights may now hold NaN."
    ),
}


def _stall_message(where, run, since, policy):
    """What a stall of `run` steps means, under each `nonfinite` policy."""
    since = f"step {since}" if since > 0 else "the start of training"
    what = {
        "skip": "were all skipped (non-finite gradients, nonfinite='skip'); "
        f"the weights have not changed since {since}",
        "zero": "all had non-finite gradients, applied as zeros "
        f"(nonfinite='zero'); no gradient has reached the weights since {since}",
        "propagate": "all had non-finite gradients, applied as they were "
        f"(nonfinite='propagate'); every update since {since} has applied "
        "NaN or Inf",
    }[policy]
    return (
        f"training has stalled at {where}: the last {run} steps {what}: "
        "nothing is being learned."
    )


_ZERO = {
    "steps": 0,
    "clipped_steps": 0,
    "nonfinite_steps": 0,
    "clip_threshold": math.inf,
    "grad_norm": math.nan,
    "window_steps": 0,
    "window_norm_sum": 0.0,
    "window_norm_max": 0.0,
    "iterations": 0,
}


def _read(optimizer, reset_window):
    """The optimizer's statistics and `iterations` (zeros before its build)."""
    if not optimizer.built:
        return dict(_ZERO)
    return optimizer.gradient_stats(reset_window=reset_window)


def _loss_scale(optimizer):
    if not optimizer.built:
        return float(optimizer.initial_scale)
    return float(ops.convert_to_numpy(optimizer.dynamic_scale))


def _unwrap(optimizer):
    """The keras-clip optimizer and the outer `LossScaleOptimizer` (or None)."""
    received = f"Received: optimizer={optimizer!r}"
    wrapped = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    loss_scaler = optimizer if wrapped else None
    inner = _inner(optimizer)
    if isinstance(inner, ClippingMixin):
        return inner, loss_scaler
    if isinstance(inner, backend.keras_optimizers("MultiOptimizer")):
        raise TypeError(
            "GradientMonitor does not support `MultiOptimizer`: it updates "
            "the variables outside the step in which keras-clip optimizers "
            f"record their gradient statistics. {received}"
        )
    name = type(inner).__name__
    suggestion = (
        f"`keras_clip.Clipped{name}(...)`"
        if f"Clipped{name}" in BUILTIN
        else f"`keras_clip.clipped({name})(...)`"
    )
    raise TypeError(
        "GradientMonitor reads the gradient statistics that keras-clip "
        f"optimizers record inside the step, and the model's optimizer `{name}` "
        f"is not one. Compile the model with {suggestion} (for any optimizer "
        "class: `keras_clip.clipped(cls)`; it also takes Keras's `clipnorm`, "
        f"`clipvalue` and `global_clipnorm`). {received}"
    )


def _inner(optimizer):
    """The optimizer inside any `LossScaleOptimizer` wrappers."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _layer_names(model):
    """Variable path -> name of the model's top-level layer that owns it."""
    out = {}
    for layer in getattr(model, "layers", ()):
        for variable in layer.trainable_weights:
            out.setdefault(variable.path, layer.name)
    return out


def _check_stats(stats):
    received = f"Received: stats={stats!r}"
    if not isinstance(stats, (list, tuple)) or not all(
        isinstance(s, str) for s in stats
    ):
        raise TypeError(f"`stats` must be a list of strings. {received}")
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        allowed = ", ".join(f'"{s}"' for s in STATS)
        raise ValueError(
            f"Unknown name {unknown[0]!r} in `stats`; the names are {allowed}. "
            f"{received}"
        )
    if len(set(stats)) != len(stats):
        raise ValueError(f"`stats` names a statistic twice. {received}")
    return tuple(stats)


def _check_action(name, value):
    if value is None:
        return None
    options = ", ".join(f'"{a}"' for a in ACTIONS)
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of {options} or None. Received: {name}={value!r}"
        )
    if value not in ACTIONS:
        raise ValueError(
            f"`{name}` must be one of {options} or None. Received: {name}={value!r}"
        )
    return value


def _print(message):
    """Prints like Keras's callbacks: on a line of its own, or to the log."""
    if keras.config.is_interactive_logging_enabled():
        print(f"\n{message}", flush=True)
    else:
        _logger.warning(message)
