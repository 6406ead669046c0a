"""`Clipped*` optimizers: every Keras optimizer with keras-clip's clipping.

One mixin, `ClippingMixin`, replaces the optimizer's gradient application with
the keras-clip step (DESIGN.md, "The contract of one optimizer step"), one
pipeline in `ClippingMixin._apply_step`:

    (accumulate) -> sum across replicas -> non-finite check -> clip
    -> weight decay -> update -> EMA -> statistics

The Keras hooks it overrides and how the updates run live in
`keras_clip.backend`. `clipped(cls)` makes the `Clipped*` class for any Keras
optimizer class; the built-in ones are defined below.
"""

import re
import warnings

import numpy as np
import keras
from keras import ops

from keras_clip import _checks
from keras_clip import backend
from keras_clip import clippers
from keras_clip import ops as kc_ops
from keras_clip import stats
from keras_clip.clippers import GlobalNormClip
from keras_clip.clippers import NormClip
from keras_clip.clippers import ValueClip

NONFINITE = ("skip", "zero", "propagate")
# Keras's clipping arguments: the clipper each one stands for, and its threshold.
_SHORTCUTS = {
    "clipnorm": (NormClip, "max_norm"),
    "clipvalue": (ValueClip, "max_value"),
    "global_clipnorm": (GlobalNormClip, "max_norm"),
}

_MIXIN_DOC = """

    keras-clip adds these arguments (see `keras_clip.ClippingMixin`):

    Args:
        clipper: A `keras_clip` clipper, a string (`"value"`, `"norm"`,
            `"global_norm"`, `"agc"`, ...) or a config dict. Defaults to
            `None` (no clipping; non-finite steps are still handled and the
            statistics still recorded).
        clipnorm: Shortcut for `clipper=NormClip(clipnorm)`.
        clipvalue: Shortcut for `clipper=ValueClip(clipvalue)`.
        global_clipnorm: Shortcut for `clipper=GlobalNormClip(global_clipnorm)`.
        nonfinite: What a step whose gradients hold a NaN or an Inf does:
            `"skip"` changes nothing (no weight, slot or clipper state) and
            counts it; `"zero"` applies a zero gradient; `"propagate"` is
            Keras's behaviour. Defaults to `"skip"`.
"""


class ClippingMixin(backend.OptimizerHooks):
    """Adds keras-clip's clipping step to a Keras optimizer class.

    Use the ready classes (`ClippedAdam`, ...) or `clipped(cls)`; the mixin is
    public so that `isinstance(opt, ClippingMixin)` tells a keras-clip
    optimizer.
    """

    def __init__(
        self,
        *args,
        clipper=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        nonfinite="skip",
        **kwargs,
    ):
        given = {
            "clipper": clipper,
            "clipnorm": clipnorm,
            "clipvalue": clipvalue,
            "global_clipnorm": global_clipnorm,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            received = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(
                "Only one of `clipper`, `clipnorm`, `clipvalue` and "
                f"`global_clipnorm` can be set. Received: {received}"
            )
        if clipnorm is not None:
            clipper = NormClip(_checks.threshold("clipnorm", clipnorm))
        elif clipvalue is not None:
            clipper = ValueClip(_checks.threshold("clipvalue", clipvalue))
        elif global_clipnorm is not None:
            clipper = GlobalNormClip(
                _checks.threshold("global_clipnorm", global_clipnorm)
            )
        clipper = clippers.get(clipper)
        if clipper is not None and clipper._state_variables is not None:
            raise ValueError(
                "This clipper already belongs to a built optimizer; give each "
                f"optimizer its own clipper. Received: clipper={clipper!r}"
            )
        nonfinite = _checks.choice("nonfinite", nonfinite, NONFINITE)
        super().__init__(*args, **kwargs)
        self.clipper = clipper
        self.nonfinite = nonfinite
        self._histograms = None
        self._readout = None
        self._readings = set()  # ids of variables not saved

    def build(self, variables):
        if self.built:
            return
        backend.check_one_process()
        # Variables made in a trace would make Keras trace its step twice.
        with backend.outside_traces(variables):
            super().build(variables)
            clipper = self.clipper
            state = {} if clipper is None else clipper.init_state(variables)
            if clipper is not None and clipper._state_variables is not None:
                raise ValueError(
                    "This clipper already belongs to another optimizer; give each "
                    f"optimizer its own clipper. Received: clipper={clipper!r}"
                )
            self._clip_state = {
                name: self.add_variable(
                    shape=np.shape(value),
                    dtype=str(np.asarray(value).dtype),
                    initializer=_constant(value),
                    name=f"clip_{name}",
                )
                for name, value in state.items()
            }
            if clipper is not None:
                clipper._bind(self._clip_state)
            self._stats = stats.build(self, len(variables))

    def gradient_stats(self, reset_window=False):
        """The gradient statistics, as Python numbers, read from the step.

        Args:
            reset_window: Bool: start a new window after reading (for readers
                that aggregate over windows, like `GradientMonitor`).
                Defaults to `False`.

        Returns:
            A dict with, for the last step, `grad_norm` (global norm before
            clipping), `clipped_grad_norm` (after), `clip_threshold` and
            `clip_scale`; since the start, `steps`, `clipped_steps`,
            `nonfinite_steps` and `clip_rate` (`clipped_steps / steps`); and
            since the last window reset, `window_steps` (finite steps),
            `window_norm_sum` and `window_norm_max`; and `iterations`, the
            optimizer's.
        """
        self._check_built()
        # One host read of every field (compiled once per optimizer; kept
        # past Keras's attribute tracking): a read or an assignment of its
        # own costs tens of microseconds each on TensorFlow.
        readers = self.__dict__.setdefault("_stats_readers", {})
        if reset_window not in readers:
            window = [self._stats[name] for name in stats.WINDOW]
            readers[reset_window] = backend.reader(
                lambda: [*(self._stats[name].value for name in stats.FIELDS),
                         ops.convert_to_tensor(self.iterations)],
                then_zero=window if reset_window else (),
            )
        *values, iterations = readers[reset_window]()
        out = stats.summary(dict(zip(stats.FIELDS, values)))
        out["iterations"] = int(iterations)
        return out

    def _keep_readout(self):
        """Has the step write the readout (see `stats.READOUT`) from its next
        trace on, for a reader that comes after every batch. Returns whether
        that is new: the step must then be traced again."""
        if self._readout is not None:
            return False
        self._readout = stats.readout_variable(self.add_variable)
        self._readings.add(id(self._readout))
        return True

    def _stats_since(self, last):
        """`gradient_stats()`, its window the updates after the reading
        `last`, from one host read of the readout and no assignment:
        `(stats, complete)` or None, as `stats.since` says."""
        return stats.since(backend.host_value(self._readout), last)

    def gradient_norms_by_variable(self):
        """The last step's gradient norm (before clipping) of each variable.

        Returns:
            A dict of variable path -> Python float, in the optimizer's order.
        """
        self._check_built()
        norms = stats.read_variable_norms(self._stats)
        return {
            getattr(v, "path", v.name): float(n)
            for v, n in zip(backend.trainable_variables(self), norms)
        }

    def _check_built(self):
        if not self.built:
            raise ValueError(
                "The optimizer has no statistics before its first step "
                "(it is not built yet)."
            )

    def record_gradient_histograms(self, histograms):
        """Counts gradient magnitudes into `histograms` from the next trace on.

        Args:
            histograms: A `keras_clip.stats.GradientHistograms` request (the
                step then counts every `histograms.freq`-th update's
                gradients, before clipping), or `None` to stop counting.

        Returns:
            Whether the request changed: the step must then be traced again
            to follow it (`model.make_train_function(force=True)`).
        """
        if histograms is not None and not isinstance(
            histograms, stats.GradientHistograms
        ):
            raise TypeError(
                "`histograms` must be a `keras_clip.stats.GradientHistograms` "
                f"or None. Received: histograms={histograms!r}"
            )
        changed = histograms is not self._histograms
        if changed and histograms is not None:
            histograms.build(self.add_variable)
            for variable in (histograms.counts, histograms.step):
                self._readings.add(id(variable))
        self._histograms = histograms
        return changed

    # Saving: the state, not the readings (`record_gradient_histograms`), so
    # that a file saved while a logger counted loads into any optimizer.

    def _saved_variables(self):
        return [v for v in self.variables if id(v) not in self._readings]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}', "
                f"because it has {len(variables)} variables whereas the "
                f"saved optimizer has {len(store.keys())} variables.",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
        if self._readout is not None:  # it described the statistics before
            self._readout.assign(ops.zeros(self._readout.shape, "int32"))

    # The step (Keras's `apply` calls it through `backend.OptimizerHooks`,
    # after undoing the loss scale and accumulating gradients).

    def _apply_step(self, grads, variables):
        """One update, in the order of DESIGN.md's step contract."""
        updates = backend.updates_for(self)  # how this context runs a step
        grads = updates.all_reduce(grads)  # what a single device would see
        values, rewrap = backend.split_sparse(grads)
        state = {name: backend.read(v) for name, v in self._clip_state.items()}
        # One pass over the gradients: their squares, and the sums the rule needs.
        sums = self._sums(values, state)
        squares = sums[:, 0]  # (for the statistics, as they were)
        norm = ops.sqrt(ops.sum(squares))
        finite = ops.isfinite(norm)  # the non-finite check
        self._record_histograms(values, variables)  # the raw gradients
        if self.nonfinite != "propagate":
            # "zero" applies a zero gradient, "skip" masks the assignments;
            # both keep NaN out of every product (NaN times 0 is NaN). A
            # scalar zero: `zeros_like(g)` becomes a constant as large as g.
            values = [ops.where(finite, g, ops.zeros((), g.dtype)) for g in values]
            sums = ops.where(finite, sums, ops.zeros_like(sums))
        clip = _Clip(self.clipper, state, sums, self.iterations)
        keep = finite if self.nonfinite == "skip" else None
        # Clip, weight decay, update, EMA.
        updates.apply(self, rewrap(values), variables, clip, keep)
        updates.assign(self._new_state(clip, state, finite)
                       + self._new_stats(clip, state, norm, finite, squares, variables))

    def _sums(self, grads, state):
        terms = () if self.clipper is None else self.clipper.tensor_terms(
            state, self.iterations
        )
        return kc_ops.tensor_sums(grads, terms)

    def _new_state(self, clip, state, finite):
        """The clipper's state after the step: adaptive state never ingests a
        non-finite step."""
        return [
            (var, ops.where(finite, clip.new_state.get(name, state[name]), state[name]))
            for name, var in self._clip_state.items()
        ]

    def _new_stats(self, clip, state, norm, finite, squares, variables):
        """The statistics after the step (a skipped or zeroed step: none
        clipped, the threshold unchanged)."""
        old = state.get("threshold", ops.array(np.inf, "float32"))
        threshold = clip.new_state.get("threshold", old)
        clipped_norm, clipped = clip.info(fallback_norm=norm)
        if self.nonfinite != "propagate":
            clipped_norm = ops.where(finite, clipped_norm, 0.0)
            clipped = ops.logical_and(finite, clipped)
            threshold = ops.where(finite, threshold, old)
        new = stats.updates(
            self._stats,
            norm=norm,
            clipped_norm=clipped_norm,
            threshold=ops.cast(threshold, "float32"),
            clipped=clipped,
            finite=finite,
            variable_norms=self._scatter_norms(ops.sqrt(squares), variables),
        )
        out = [(self._stats[name], value) for name, value in new.items()]
        if self._readout is not None:
            out.append((self._readout, stats.readout(new, self._readout.value, backend.bitcast)))
        return out

    def _record_histograms(self, grads, variables):
        histograms = self._histograms
        if histograms is None:
            return

        def count():
            new = histograms.updates(
                grads, variables, self.iterations, backend.bincount
            )
            for variable, value in new:
                variable.assign(value)
            return []

        backend.run_if(
            histograms.due(self.iterations), count, lambda: [],
            [histograms.counts, histograms.step],
        )

    def _scatter_norms(self, norms, variables):
        """Per-variable norms laid out like the optimizer's variable list."""
        everything = backend.trainable_variables(self)
        index = [backend.variable_index(self, v) for v in variables]
        if index == list(range(len(everything))):
            return norms
        # Some variables had no gradient this step: they get a zero norm.
        columns = [ops.zeros((), "float32")] * len(everything)
        for i, j in enumerate(index):
            columns[j] = norms[i]
        return ops.stack(columns)

    # Keras's own clipping attributes tell the truth: `clipnorm`,
    # `clipvalue` and `global_clipnorm` read the threshold of a `NormClip`,
    # `ValueClip` or `GlobalNormClip` clipper (however it was given), and
    # setting one sets that threshold (read by the next step, no re-tracing).

    clipnorm = property(
        lambda self: self._shortcut("clipnorm"),
        lambda self, value: self._set_shortcut("clipnorm", value),
    )
    clipvalue = property(
        lambda self: self._shortcut("clipvalue"),
        lambda self, value: self._set_shortcut("clipvalue", value),
    )
    global_clipnorm = property(
        lambda self: self._shortcut("global_clipnorm"),
        lambda self, value: self._set_shortcut("global_clipnorm", value),
    )

    def _shortcut(self, name):
        cls, attr = _SHORTCUTS[name]
        clipper = self.__dict__.get("clipper")
        return getattr(clipper, attr) if type(clipper) is cls else None

    def _set_shortcut(self, name, value):
        cls, attr = _SHORTCUTS[name]
        clipper = self.__dict__.get("clipper")
        if value is None and type(clipper) is not cls:
            return  # Keras's `__init__` sets all three to None.
        if type(clipper) is not cls:
            raise ValueError(
                f"`{name}` can only change the threshold of a "
                f"`{cls.__name__}` clipper; this optimizer's clipper is "
                f"{clipper!r}. Give the clipper when creating the optimizer. "
                f"Received: {name}={value!r}"
            )
        setattr(clipper, attr, _checks.threshold(name, value))

    def get_config(self):
        config = super().get_config()
        shortcut = [
            name for name in _SHORTCUTS
            if isinstance(config.get(name), float)
        ]
        # A fixed NormClip, ValueClip or GlobalNormClip is saved as Keras
        # saves it (`clipnorm=1.0`), and comes back the same.
        config["clipper"] = None if shortcut else clippers.serialize(self.clipper)
        for name in _SHORTCUTS:
            if name not in shortcut:
                config[name] = None
        config["nonfinite"] = self.nonfinite
        return config


class _Clip:
    """The clipper's part of one step, passed to the step's updates.

    `clip(grads, params)` clips a list through `clipper.update` (with the
    step's state and sums); a separable rule may instead be called on one
    tensor at a time (`rows=[i]`, its row of the sums), right before that
    tensor's update. Either way the results are collected for the state and
    the statistics. Sparse gradients are clipped as their rows.
    """

    def __init__(self, clipper, state, sums, step):
        self.clipper = clipper
        self.state = state
        self.sums = sums
        self.step = step
        self.separable = clipper is not None and clipper.separable
        self.new_state = {}
        self._infos = {}

    def __call__(self, grads, params, rows=None):
        if self.clipper is None:
            return grads
        sums = self.sums if rows is None else ops.take(self.sums, rows, axis=0)
        parts = [backend.dense_values(g) for g in grads]
        clipped, self.new_state, info = self.clipper.update(
            [values for values, _ in parts], self.state, params,
            step=self.step, sums=sums,
        )
        self._infos[None if rows is None else tuple(rows)] = info
        return [rewrap(c) for (_, rewrap), c in zip(parts, clipped)]

    def scalars(self, i):
        """What the update chain waits for after tensor `i` (separable rules:
        its clipped norm, taken while the tensor is in cache)."""
        info = self._infos.get((i,))
        return () if info is None else (info["clipped_norm"],)

    def info(self, fallback_norm):
        """`(clipped_norm, clipped)` of the step: from one call on the whole
        list, or combined from the per-tensor calls."""
        if self.clipper is None:
            return fallback_norm, ops.array(False)
        infos = list(self._infos.values())
        if len(infos) == 1 and None in self._infos:
            info = infos[0]
            return ops.cast(info["clipped_norm"], "float32"), ops.cast(info["clipped"], "bool")
        if not infos:
            return ops.zeros((), "float32"), ops.array(False)
        norms = ops.stack([ops.cast(i["clipped_norm"], "float32") for i in infos])
        flags = ops.stack([ops.cast(i["clipped"], "bool") for i in infos])
        return ops.sqrt(ops.sum(ops.square(norms))), ops.any(flags)


def _constant(value):
    value = np.asarray(value)

    def initializer(shape, dtype=None):
        return ops.cast(ops.convert_to_tensor(value), dtype or value.dtype)

    return initializer


_CLIPPED = {}
_WRAPPERS = backend.keras_optimizers("LossScaleOptimizer", "MultiOptimizer")
# `model.optimizer.gradient_stats()` also when Keras wrapped the optimizer for
# mixed precision.
backend.forward_gradient_stats(keras.optimizers.LossScaleOptimizer)


def clipped(cls):
    """Returns the `Clipped*` class for any Keras optimizer class.

    The class is `ClippingMixin` on top of `cls`, registered for Keras
    serialization as `keras_clip>Clipped<registered name of cls>`, so a model
    saved with it reloads once `clipped(cls)` has run again. Calling it twice
    returns the same class.

    Args:
        cls: A subclass of `keras.optimizers.Optimizer` (not a wrapper such as
            `LossScaleOptimizer` or `MultiOptimizer`: clip the optimizers
            inside them).

    Returns:
        The clipped class.

    Example:

    >>> ClippedLion = clipped(keras.optimizers.Lion)
    >>> opt = ClippedLion(learning_rate=1e-4, global_clipnorm=1.0)
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
        raise TypeError(
            "`clipped()` takes a subclass of `keras.optimizers.Optimizer`. "
            f"Received: cls={cls!r}"
        )
    if issubclass(cls, ClippingMixin):
        return cls
    cls = backend.optimizer.public_class(cls)
    if issubclass(cls, _WRAPPERS):
        raise TypeError(
            f"`{cls.__name__}` wraps other optimizers; clip the optimizer(s) "
            f"inside it instead, e.g. `LossScaleOptimizer(ClippedAdam(...))`. "
            f"Received: cls={cls!r}"
        )
    if cls in _CLIPPED:
        return _CLIPPED[cls]
    new = type(f"Clipped{cls.__name__}", (ClippingMixin, cls), {})
    new.__module__ = cls.__module__
    return _registered(new, cls)


def _registered(new, cls):
    """Documents and registers `new`, the `Clipped*` class of `cls`."""
    # The base's examples stay as code, not doctests (they run the base).
    base_doc = re.sub(r"^(\s*)(>>>|\.\.\.) ?", r"\1", cls.__doc__ or "", flags=re.M)
    new.__doc__ = (
        f"`{cls.__name__}` with keras-clip's clipping.\n\n"
        + base_doc.rstrip() + _MIXIN_DOC
    )
    registered = keras.saving.get_registered_name(cls).replace(">", ".")
    keras.saving.register_keras_serializable(
        package="keras_clip", name=f"Clipped{registered}"
    )(new)
    _CLIPPED[cls] = new
    return new


def _builtin(new):
    """A `Clipped*` class defined below, for the Keras class it extends."""
    return _registered(new, new.__bases__[1])


def builtin_optimizer_classes():
    """Every optimizer class `keras.optimizers` exports, wrappers excluded."""
    out = {}
    for name in dir(keras.optimizers):
        obj = getattr(keras.optimizers, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, keras.optimizers.Optimizer)
            and obj is not keras.optimizers.Optimizer
            and not issubclass(obj, _WRAPPERS)
        ):
            out[name] = obj
    return out


# The built-in optimizers, one class each (so that tools and readers see
# them); tests/test_optimizers.py checks this list against `keras.optimizers`.


@_builtin
class ClippedAdadelta(ClippingMixin, keras.optimizers.Adadelta):
    pass


@_builtin
class ClippedAdafactor(ClippingMixin, keras.optimizers.Adafactor):
    pass


@_builtin
class ClippedAdagrad(ClippingMixin, keras.optimizers.Adagrad):
    pass


@_builtin
class ClippedAdam(ClippingMixin, keras.optimizers.Adam):
    pass


@_builtin
class ClippedAdamW(ClippingMixin, keras.optimizers.AdamW):
    pass


@_builtin
class ClippedAdamax(ClippingMixin, keras.optimizers.Adamax):
    pass


@_builtin
class ClippedFtrl(ClippingMixin, keras.optimizers.Ftrl):
    pass


@_builtin
class ClippedLamb(ClippingMixin, keras.optimizers.Lamb):
    pass


@_builtin
class ClippedLion(ClippingMixin, keras.optimizers.Lion):
    pass


if hasattr(keras.optimizers, "Muon"):  # Keras 3.10 and later

    @_builtin
    class ClippedMuon(ClippingMixin, keras.optimizers.Muon):
        pass


@_builtin
class ClippedNadam(ClippingMixin, keras.optimizers.Nadam):
    pass


@_builtin
class ClippedRMSprop(ClippingMixin, keras.optimizers.RMSprop):
    pass


@_builtin
class ClippedSGD(ClippingMixin, keras.optimizers.SGD):
    pass


if hasattr(keras.optimizers, "ScheduleFreeAdamW"):  # Keras 3.14 and later

    @_builtin
    class ClippedScheduleFreeAdamW(ClippingMixin, keras.optimizers.ScheduleFreeAdamW):
        pass


BUILTIN = {cls.__name__: cls for cls in _CLIPPED.values()}
