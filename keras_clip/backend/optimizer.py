"""Keras optimizer internals: the hooks keras-clip overrides, the private
names it calls, and how one step's updates run (`updates_for`)."""

import collections
import contextlib

import keras
from keras import ops

from keras_clip import backend

# Every private name of Keras's optimizers keras-clip overrides or calls
# (tests/test_backend.py checks that each exists, for the installed Keras).
HOOKS = (
    # overridden (`OptimizerHooks`)
    "BaseOptimizer._backend_apply_gradients",
    "BaseOptimizer._clip_gradients",
    "BaseOptimizer._get_current_learning_rate",
    # called
    "BaseOptimizer._accumulated_gradients",
    "BaseOptimizer._backend_increment_gradient_accumulators",
    "BaseOptimizer._backend_reset_gradient_accumulators",
    "BaseOptimizer._backend_update_step",
    "BaseOptimizer._apply_weight_decay",
    "BaseOptimizer._get_variable_index",
    "BaseOptimizer._iterations",
    "BaseOptimizer._model_variables_moving_average",
    "BaseOptimizer._trainable_variables",
    "BaseOptimizer._update_model_variables_moving_average",
    "BaseOptimizer._use_weight_decay",
    "BaseOptimizer._overwrite_model_variables_with_average_value",
    "TFOptimizer._distributed_tf_update_step",
)


# Keras before 3.10 counts a step (`_iterations += 1`) at the end of
# `_backend_apply_gradients`, which keras-clip replaces; from 3.10 on, `apply`
# counts it after that call.
COUNTS_STEP_IN_BACKEND_APPLY = tuple(
    int(x) for x in keras.version().split(".")[:2]
) < (3, 10)


class OptimizerHooks:
    """The Keras optimizer methods keras-clip overrides, in one place.

    Keras's `apply` unscales the gradients and calls
    `_backend_apply_gradients`, which clips (`_clip_gradients`), decays and
    updates: here it accumulates (when `gradient_accumulation_steps` is set)
    and hands every update step to `self._apply_step(grads, variables)`,
    keras-clip's step. Keras's clipping never runs on top.

    While `skip_masked(optimizer, keep)` is active, every assignment Keras's
    update code makes through `assign`, `assign_add` and `assign_sub` keeps
    the old value where `keep` is false, and the learning rate is zero there
    (which leaves any weight decay, `w - w * wd * lr`, a no-op): a skipped
    step runs like any other, with no `cond`, so XLA fuses the mask into
    the update. This mask is the one piece of a step kept on the optimizer:
    Keras's `update_step` assigns through `self`, and nothing else reaches it.
    """

    _skip_mask = None

    def _backend_apply_gradients(self, grads, trainable_variables):
        self._accumulate_or_apply(grads, trainable_variables)
        if COUNTS_STEP_IN_BACKEND_APPLY:
            self._iterations.assign_add(1)

    def _accumulate_or_apply(self, grads, trainable_variables):
        steps = self.gradient_accumulation_steps
        if not steps:
            self._apply_step(grads, trainable_variables)
            return
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)]
            for v in trainable_variables
        ]

        def update():
            mean = [(g + a) / steps for g, a in zip(grads, accumulators)]
            self._apply_step(mean, trainable_variables)
            self._backend_reset_gradient_accumulators()
            return []

        def accumulate():
            self._backend_increment_gradient_accumulators(grads, accumulators)
            return []

        backend.run_if(
            (self._iterations + 1) % steps == 0, update, accumulate,
            [*self.variables, *trainable_variables],
        )

    def _clip_gradients(self, grads):
        return grads

    def assign(self, variable, value):
        if self._skip_mask is not None:
            value = backend.keep_unless(self._skip_mask, value, variable)
        super().assign(variable, value)

    def assign_add(self, variable, value):
        if self._skip_mask is not None:
            value = backend.zero_unless(self._skip_mask, value)
        super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        if self._skip_mask is not None:
            value = backend.zero_unless(self._skip_mask, value)
        super().assign_sub(variable, value)

    def _get_current_learning_rate(self):
        learning_rate = super()._get_current_learning_rate()
        if self._skip_mask is None:
            return learning_rate
        learning_rate = ops.convert_to_tensor(learning_rate)
        return ops.where(self._skip_mask, learning_rate, ops.zeros_like(learning_rate))


@contextlib.contextmanager
def skip_masked(optimizer, keep):
    """Masks the optimizer's assignments with `keep` (see `OptimizerHooks`);
    `keep=None` masks nothing."""
    optimizer.__dict__["_skip_mask"] = keep  # (past Keras's attribute tracking)
    try:
        yield
    finally:
        optimizer.__dict__["_skip_mask"] = None


def public_class(cls):
    """The `keras.optimizers` class that Keras's backend-specific `cls`
    stands for (on torch, `type(keras.optimizers.Adam())` is Keras's own
    fused subclass of `Adam`), else `cls`."""
    if not cls.__module__.startswith("keras.src.backend."):
        return cls
    public = {v for v in vars(keras.optimizers).values() if isinstance(v, type)}
    return next((c for c in cls.__mro__ if c in public), cls)


def variable_index(optimizer, variable):
    """The variable's position in the optimizer's variable list."""
    return optimizer._get_variable_index(variable)


def trainable_variables(optimizer):
    """The variables the optimizer was built with, in its order."""
    return optimizer._trainable_variables


def decay(optimizer, variables):
    """Keras's (or the optimizer's own) decoupled weight decay, on those of
    `variables` it applies to (Keras on torch fails on an empty list)."""
    variables = [v for v in variables if optimizer._use_weight_decay(v)]
    if variables:
        optimizer._apply_weight_decay(variables)


def moving_average(optimizer, keep=None):
    """Keras's EMA update of the model's weights (`use_ema=True`), only
    where `keep` holds (Keras assigns the averages directly, past the mask)."""
    if not optimizer.use_ema:
        return
    variables = optimizer._trainable_variables

    def update():
        optimizer._update_model_variables_moving_average(variables)
        if optimizer.ema_overwrite_frequency:
            every = optimizer.ema_overwrite_frequency

            def overwrite():
                optimizer._overwrite_model_variables_with_average_value(variables)
                return []

            backend.run_if(
                (optimizer.iterations + 1) % every == 0, overwrite, lambda: [],
                variables,
            )
        return []

    if keep is None:
        update()
        return
    averages = [a for a in optimizer._model_variables_moving_average if a is not None]
    backend.run_if(keep, update, lambda: [], [*averages, *variables])


# How one step's updates run: an execution detail behind one seam.
# `all_reduce(grads)` sums them across replicas (where there are several);
# `apply` takes the gradients (a sparse one as its unique rows), the variables, the
# step's clip (`clip(grads, params)`, see `optimizers._Clip`) and `keep`
# (skip the step's assignments where false, or None), and runs: clip ->
# weight decay -> update -> EMA. `assign(pairs)` then writes the step's
# statistics and clipper state in the context the strategy needs.


def updates_for(optimizer):
    """The execution for the current context: several replicas in sync ->
    `CrossReplica`; a `tf.distribute` strategy with one, or an optimizer
    with an update loop of its own (Nadam's) -> `KerasOrder`; else
    `InOrder`."""
    replica = backend.replica_context()
    if replica is not None:
        return CrossReplica(replica)
    if backend.has_strategy() or _own_update_loop(optimizer):
        return KerasOrder()
    return InOrder()


def _own_update_loop(optimizer):
    """Whether the optimizer's class overrides Keras's `_backend_update_step`
    (which, on one device, calls `update_step` for each variable)."""
    method = type(optimizer)._backend_update_step
    return not method.__module__.startswith(
        ("keras.src.optimizers.base_optimizer", "keras.src.backend.")
    )


class _Weight(collections.namedtuple("_Weight", ["value", "path"])):
    """A weight's value and path: what a rule reads of a variable."""


class InOrder:
    """One device: each variable decayed and updated (`update_step`, as
    Keras's own loop does), in reverse order; the large ones right after
    each other, two at a time (`backend.UpdateChain`).

    In reverse: the gradients the sums read last are still in cache when
    their update runs. A separable rule clips each large tensor right before
    its own update, too, and the small ones together, first: on a small
    tensor each kernel's fixed cost, not the memory, sets the time, and an
    ordered update would wait on its neighbours for nothing.
    """

    def all_reduce(self, grads):
        return grads

    def apply(self, optimizer, grads, variables, clip, keep):
        chain = backend.UpdateChain()
        ordered = [chain.orders(v) for v in variables]
        with skip_masked(optimizer, keep):
            learning_rate = optimizer.learning_rate
            together = [i for i in range(len(variables))
                        if not (clip.separable and ordered[i])]
            if together:
                grads = list(grads)
                rows = None if len(together) == len(variables) else together
                clipped = clip([grads[i] for i in together],
                               [variables[i] for i in together], rows=rows)
                for i, gradient in zip(together, clipped):
                    grads[i] = gradient
            for i in reversed(range(len(variables))):
                variable = variables[i]
                gradient = grads[i]
                if ordered[i]:
                    gradient = chain.after_previous(gradient)
                if clip.separable and ordered[i]:
                    # The weight read in order too (AGC's norms), as a variable.
                    weight = _Weight(
                        chain.after_previous(backend.read(variable)), variable.path
                    )
                    (gradient,) = clip([gradient], [weight], rows=[i])
                # Decay here, not for all variables first: the weight is in cache.
                decay(optimizer, [variable])
                optimizer.update_step(gradient, variable, learning_rate)
                if ordered[i]:
                    chain.link(variable, *clip.scalars(i))
        moving_average(optimizer, keep)

    def assign(self, pairs):
        for variable, value in pairs:
            variable.assign(value)


class KerasOrder:
    """A `tf.distribute` strategy with one replica: Keras's own update path
    (its weight decay cannot run inside its per-variable update there)."""

    def all_reduce(self, grads):
        return grads

    def apply(self, optimizer, grads, variables, clip, keep):
        with skip_masked(optimizer, keep):
            clipped = clip(grads, variables)
            decay(optimizer, variables)
            optimizer._backend_update_step(clipped, variables, optimizer.learning_rate)
        moving_average(optimizer, keep)

    def assign(self, pairs):
        for variable, value in pairs:
            variable.assign(value)


class CrossReplica:
    """Several replicas in sync: every replica clips the same summed
    gradients, and the assignments happen once, in cross-replica context
    (a `merge_call`); a skipped step is a `cond` there."""

    def __init__(self, replica):
        self.replica = replica

    def all_reduce(self, grads):
        return backend.all_reduce_sum(self.replica, grads)

    def apply(self, optimizer, grads, variables, clip, keep):
        from keras_clip.backend import tensorflow

        clipped = clip(grads, variables)

        def apply(distribution, clipped, keep):
            def run():
                if optimizer.weight_decay is not None:
                    learning_rate = optimizer.learning_rate
                    for variable in variables:
                        if optimizer._use_weight_decay(variable):
                            tensorflow.cross_replica_decay(
                                distribution, variable, optimizer.weight_decay,
                                learning_rate,
                            )
                optimizer._distributed_tf_update_step(
                    distribution,
                    [(g, v.value) for g, v in zip(clipped, variables)],
                    optimizer.learning_rate,
                )
                moving_average(optimizer)
                return []

            if keep is None:
                run()
                return
            # Every replica computed the same `keep` from the same sums.
            keep = distribution.experimental_local_results(keep)[0]
            backend.run_if(keep, run, lambda: [], [])

        self.replica.merge_call(apply, args=(clipped, keep))

    def assign(self, pairs):
        from keras_clip.backend import tensorflow

        variables = [v for v, _ in pairs]
        values = [x for _, x in pairs]

        def assign(distribution, values):
            for variable, value in zip(variables, values):
                tensorflow.cross_replica_assign(distribution, variable, value)

        self.replica.merge_call(assign, args=(values,))
