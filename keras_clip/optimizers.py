"""`Clipped*` optimizers: every Keras optimizer with keras-clip's clipping.

One mixin, `ClippingMixin`, replaces the optimizer's gradient application with
the keras-clip step (DESIGN.md, "The contract of one optimizer step"):

    accumulate (optional) -> non-finite check -> clip -> weight decay
    -> update -> EMA -> statistics

`clipped(cls)` makes the `Clipped*` class for any Keras optimizer class.
"""

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
from keras_clip.clippers.base import per_tensor_info

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


class ClippingMixin:
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
        if clipper is not None and clipper._variables is not None:
            raise ValueError(
                "This clipper already belongs to a built optimizer; give each "
                f"optimizer its own clipper. Received: clipper={clipper!r}"
            )
        nonfinite = _checks.choice("nonfinite", nonfinite, NONFINITE)
        super().__init__(*args, **kwargs)
        self.clipper = clipper
        self.nonfinite = nonfinite
        self._histograms = None

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        clipper = self.clipper
        state = {} if clipper is None else clipper.init_state(variables)
        if clipper is not None and clipper._variables is not None:
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
            `window_norm_sum` and `window_norm_max`.
        """
        self._check_built()
        out = stats.read(self._stats)
        if reset_window:
            stats.reset_window(self._stats)
        return out

    def gradient_norms_by_variable(self):
        """The last step's gradient norm (before clipping) of each variable.

        Returns:
            A dict of variable path -> Python float, in the optimizer's order.
        """
        self._check_built()
        norms = stats.read_variable_norms(self._stats)
        return {
            getattr(v, "path", v.name): float(n)
            for v, n in zip(self._trainable_variables, norms)
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
        changed = histograms is not self._histograms
        self._histograms = histograms
        return changed

    # The step.

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self.gradient_accumulation_steps:
            self._clipped_update(grads, trainable_variables)
            return
        steps = self.gradient_accumulation_steps
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)]
            for v in trainable_variables
        ]

        def update():
            mean = [(g + a) / steps for g, a in zip(grads, accumulators)]
            self._clipped_update(mean, trainable_variables)
            self._backend_reset_gradient_accumulators()

        def accumulate():
            self._backend_increment_gradient_accumulators(grads, accumulators)

        ops.cond((self._iterations + 1) % steps == 0, update, accumulate)

    def _clipped_update(self, grads, variables):
        """Non-finite check, clip, weight decay, update, EMA, statistics.

        Under `tf.distribute` with several replicas the gradients are summed
        across replicas first, so the clipper sees what a single device would
        see, and every assignment happens once, in cross-replica context.
        """
        replica = backend.replica_context()
        if replica is not None:
            grads = backend.all_reduce_sum(replica, grads)
        values, rewrap = backend.split_sparse(grads)
        current = {k: v.value for k, v in self._clip_state.items()}
        old_threshold = current.get("threshold", ops.array(np.inf, "float32"))
        # A per-tensor rule clips each gradient in `update_step` (see below),
        # except under `tf.distribute`; the sums it needs are taken here.
        chained = not backend.has_strategy()
        per_tensor = (
            chained and self.clipper is not None and self.clipper.per_tensor
        )
        threshold = (
            self.clipper.step_threshold(current, self.iterations)
            if per_tensor else None
        )
        terms = self.clipper.tensor_terms(threshold) if per_tensor else ()
        if terms:
            columns = [kc_ops._sums(g, (_square, *terms)) for g in values]
            squares = ops.stack([c[0] for c in columns])
            sums = ops.stack([ops.stack(c[1:]) for c in columns])
        else:
            squares, sums = kc_ops._sq_norms(values), None
        norm = ops.sqrt(ops.sum(squares))
        finite = ops.isfinite(norm)
        if self._histograms is not None:
            self._record_histograms(values, variables)
        if self.nonfinite in ("zero", "skip"):
            # Zero the gradient of a non-finite step: "zero" applies it, "skip"
            # masks its assignments, and both keep NaN out of every product
            # (a NaN times the mask's 0 would still be NaN).
            # (A scalar zero, not `zeros_like(g)`: TensorFlow folds that into
            # a constant as large as the gradients when it compiles the step.)
            values = [ops.where(finite, g, ops.zeros((), g.dtype)) for g in values]
            norm_in = ops.where(finite, norm, ops.zeros_like(norm))
            squares_in = ops.where(finite, squares, ops.zeros_like(squares))
            if sums is not None:
                sums = ops.where(finite, sums, ops.zeros_like(sums))
        else:
            norm_in, squares_in = norm, squares

        def clip():
            if self.clipper is None:
                info = {"clipped": ops.array(False), "clipped_norm": norm_in}
                return values, {}, info, old_threshold
            clipped, new_state, info = self.clipper.update(
                values, current, variables, norm=norm_in, step=self.iterations,
                squares=squares_in,
            )
            # Adaptive state never ingests a non-finite step.
            new_state = {
                k: ops.where(finite, new_state[k], current[k]) for k in current
            }
            return clipped, new_state, info, new_state.get("threshold", old_threshold)

        def summary(info, threshold):
            return [
                ops.cast(info["clipped_norm"], "float32"),
                ops.cast(info["clipped"], "bool"),
                ops.cast(threshold, "float32"),
            ]

        def skipped():
            return [ops.zeros((), "float32"), ops.array(False), old_threshold]

        skip = self.nonfinite == "skip"
        if replica is None:
            # A skipped step runs like any other, with every assignment masked
            # (see `assign`): no `cond`, so XLA fuses the mask into the update.
            # Each variable is decayed and updated in `update_step`, in order,
            # two at a time (see `backend.UpdateChain`), in reverse: the gradients
            # the norm read last are still in cache when their update runs. A
            # per-tensor rule clips each gradient there too, right before its
            # update.
            # (Not under a one-device `tf.distribute` strategy: Keras's weight
            # decay cannot run inside its per-variable update there.)
            self.__dict__["_update_mask"] = finite if skip else None
            self.__dict__["_chain"] = backend.UpdateChain() if chained else None
            try:
                if per_tensor:
                    tensor_clip = _TensorClip(
                        self, variables, threshold, squares_in, sums
                    )
                    self.__dict__["_tensor_clip"] = tensor_clip
                    new_state = {"threshold": ops.where(
                        finite, tensor_clip.threshold, old_threshold
                    )}
                    clipped = values
                else:
                    clipped, new_state, info, threshold = clip()
                for name, var in self._clip_state.items():
                    var.assign(new_state[name])
                if not chained:
                    self._apply_weight_decay(variables)
                self._backend_update_step(
                    rewrap(clipped)[::-1], variables[::-1], self.learning_rate
                )
                self._moving_average_step()
                if per_tensor:
                    info, threshold = tensor_clip.info(), new_state["threshold"]
            finally:
                self.__dict__["_update_mask"] = None
                self.__dict__["_chain"] = None
                self.__dict__["_tensor_clip"] = None
            result = summary(info, threshold)
        else:
            clipped, new_state, info, threshold = clip()
            result = summary(info, threshold)
        if skip:
            result = [ops.where(finite, a, b) for a, b in zip(result, skipped())]
        clipped_norm, clipped_flag, threshold = result
        updates = stats.updates(
            self._stats,
            norm=norm,
            clipped_norm=clipped_norm,
            threshold=threshold,
            clipped=clipped_flag,
            finite=finite,
            variable_norms=self._scatter_norms(ops.sqrt(squares), variables),
        )
        if replica is None:
            for name, value in updates.items():
                self._stats[name].assign(value)
            return
        backend.merge_call(
            replica,
            self._cross_replica_update,
            finite,
            rewrap(clipped),
            new_state,
            updates,
            variables,
        )

    def _cross_replica_update(
        self, distribution, finite, grads, new_state, updates, variables
    ):
        """The assignments of a distributed step, once, in cross-replica context.

        Every replica computed the same values (from the same summed
        gradients), so the first replica's `finite` decides for all of them.
        """
        finite = distribution.experimental_local_results(finite)[0]
        assign = backend.cross_replica_assign

        def apply():
            for name, var in self._clip_state.items():
                assign(distribution, var, new_state[name])
            if self.weight_decay is not None:
                lr = self.learning_rate
                for var in variables:
                    if self._use_weight_decay(var):
                        backend.cross_replica_decay(
                            distribution, var, self.weight_decay, lr
                        )
            self._distributed_tf_update_step(
                distribution,
                [(g, v.value) for g, v in zip(grads, variables)],
                self.learning_rate,
            )
            self._moving_average_step()
            return []

        if self.nonfinite == "skip":
            backend.run_if(finite, apply, lambda: [], [])
        else:
            apply()
        for name, value in updates.items():
            assign(distribution, self._stats[name], value)

    def _record_histograms(self, grads, variables):
        histograms = self._histograms

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
        index = [self._get_variable_index(v) for v in variables]
        if index == list(range(len(self._trainable_variables))):
            return norms
        # Some variables had no gradient this step: they get a zero norm.
        columns = [ops.zeros((), "float32")] * len(self._trainable_variables)
        for i, j in enumerate(index):
            columns[j] = norms[i]
        return ops.stack(columns)

    def _moving_average_step(self):
        """Keras's EMA update, through `assign` so that a skip skips it too."""
        if not self.use_ema:
            return
        pairs = [
            (var, average)
            for var, average in zip(
                self._trainable_variables, self._model_variables_moving_average
            )
            if average is not None
        ]
        not_first = ops.not_equal(self.iterations, 0)
        for var, average in pairs:
            momentum = ops.cast(not_first, var.dtype) * self.ema_momentum
            self.assign(average, momentum * average + (1 - momentum) * var)
        if self.ema_overwrite_frequency:
            overwrite = (self.iterations + 1) % self.ema_overwrite_frequency == 0
            for var, average in pairs:
                self.assign(var, ops.where(overwrite, average, var))

    # Skipping a non-finite step: while `_update_mask` is set (a traced bool),
    # every assignment keeps the old value where it is false, and the learning
    # rate is zero there, which leaves weight decay (`w - w * wd * lr`) a no-op
    # whatever the optimizer's decay code. Keras's update steps all assign
    # through these three methods.

    _update_mask = None
    _chain = None
    _tensor_clip = None

    def update_step(self, gradient, variable, learning_rate):
        chain = self._chain
        if chain is None:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        gradient = chain.after_previous(gradient)
        done = ()
        if self._tensor_clip is not None:
            gradient, done = self._tensor_clip(gradient, variable, index, chain)
        # Decay here, not for all variables first: the weight is in cache.
        self._apply_weight_decay([self._trainable_variables[index]])
        super().update_step(gradient, variable, learning_rate)
        chain.link(variable, *done)

    def assign(self, variable, value):
        if self._update_mask is not None:
            value = backend.keep_unless(self._update_mask, value, variable)
        super().assign(variable, value)

    def assign_add(self, variable, value):
        if self._update_mask is not None:
            value = backend.zero_unless(self._update_mask, value)
        super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        if self._update_mask is not None:
            value = backend.zero_unless(self._update_mask, value)
        super().assign_sub(variable, value)

    def _get_current_learning_rate(self):
        learning_rate = super()._get_current_learning_rate()
        if self._update_mask is None:
            return learning_rate
        learning_rate = ops.convert_to_tensor(learning_rate)
        return ops.where(self._update_mask, learning_rate, ops.zeros_like(learning_rate))

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

    def _clip_gradients(self, grads):
        # The clipper clips, in the step; Keras's clipping never runs on top.
        return grads

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


class _TensorClip:
    """A per-tensor rule, applied in `update_step` right before each update.

    The clipper's `clip_tensor` sees the gradient and the weight (read before
    the weight decay, as in the list path) just before that variable's update
    (see `backend.UpdateChain`), and the clipped sums of squares and flags
    are collected for the statistics.
    """

    def __init__(self, optimizer, variables, threshold, squares, sums):
        self.clipper = optimizer.clipper
        self.threshold = threshold
        self.variables = variables
        self.position = {
            optimizer._get_variable_index(v): i for i, v in enumerate(variables)
        }
        self.squares = squares
        self.sums = sums
        self.results = {}

    def __call__(self, gradient, variable, index, chain):
        """Returns the clipped gradient and the scalars the chain waits for."""
        i = self.position[index]
        values, rewrap = backend.dense_values(gradient)
        param = chain.after_previous(backend.read(variable))
        clipped, square_after, flag = self.clipper.clip_tensor(
            values, param, self.threshold, square=self.squares[i],
            sums=() if self.sums is None else tuple(ops.unstack(self.sums[i])),
            path=self.variables[i].path,
        )
        self.results[i] = (square_after, flag)
        return rewrap(clipped), (square_after,)

    def info(self):
        if len(self.results) != len(self.variables):
            raise RuntimeError(
                "keras-clip clips per tensor in `update_step`, but this "
                f"optimizer updated {len(self.results)} of "
                f"{len(self.variables)} variables through it."
            )
        squares_after, flags = zip(*(self.results[i] for i in range(len(self.results))))
        return per_tensor_info(list(squares_after), list(flags))


def _square(x):
    return ops.square(ops.cast(x, "float32"))


def _constant(value):
    value = np.asarray(value)

    def initializer(shape, dtype=None):
        return ops.cast(ops.convert_to_tensor(value), dtype or value.dtype)

    return initializer


_CLIPPED = {}
_WRAPPERS = (keras.optimizers.LossScaleOptimizer, keras.optimizers.MultiOptimizer)
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
    if issubclass(cls, _WRAPPERS):
        raise TypeError(
            f"`{cls.__name__}` wraps other optimizers; clip the optimizer(s) "
            f"inside it instead, e.g. `LossScaleOptimizer(ClippedAdam(...))`. "
            f"Received: cls={cls!r}"
        )
    if cls in _CLIPPED:
        return _CLIPPED[cls]
    builtin = cls.__module__.startswith("keras.")
    new = type(
        f"Clipped{cls.__name__}",
        (ClippingMixin, cls),
        {
            "__doc__": f"`{cls.__name__}` with keras-clip's clipping."
            + _MIXIN_DOC,
            "__module__": "keras_clip.optimizers" if builtin else cls.__module__,
        },
    )
    registered = keras.saving.get_registered_name(cls).replace(">", ".")
    keras.saving.register_keras_serializable(
        package="keras_clip", name=f"Clipped{registered}"
    )(new)
    _CLIPPED[cls] = new
    return new


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


BUILTIN = {f"Clipped{n}": clipped(c) for n, c in builtin_optimizer_classes().items()}
globals().update(BUILTIN)
