"""The few backend-specific pieces of keras-clip.

Only this package touches backend internals (TensorFlow's `tf.cond` with
stateful branches, `tf.IndexedSlices`). Everything else is `keras.ops`.
"""

import keras
from keras import ops
from keras import tree


def run_if(pred, fn, fallback, protect):
    """Runs `fn()` (which may assign variables) only where `pred` is true.

    Returns `fn()`'s result where `pred` holds and `fallback()`'s otherwise;
    both return the same structure of tensors. On TensorFlow this is one
    `tf.cond`; elsewhere (JAX's stateless tracing) `fn` runs and every variable
    in `protect` is then restored where `pred` is false.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.cond(pred, fn, fallback)
    old = [v.value for v in protect]
    out = fn()
    for v, o in zip(protect, old):
        v.assign(ops.where(pred, v.value, o))
    return tree.map_structure(lambda a, b: ops.where(pred, a, b), out, fallback())


def bincount(index, length):
    """How many entries of the int32 `index` hold each value in `[0, length)`.

    Of fixed length, so it compiles with XLA, also inside `run_if`
    (`ops.bincount` derives its length from the data, which XLA cannot
    always resolve there).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A fixed-size DenseBincount: 2-4x faster than a segment sum on CPU.
        return tf.raw_ops.DenseBincount(
            input=index,
            size=tf.constant(length, index.dtype),
            weights=tf.zeros((0,), "int32"),
        )
    return ops.segment_sum(ops.ones_like(index), index, num_segments=length)


def _is_sparse(value):
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(value, tf.IndexedSlices)


def keep_unless(mask, value, variable):
    """`value` where `mask` holds, else the variable's current value."""
    if _is_sparse(value):
        import tensorflow as tf

        old = tf.gather(getattr(variable, "value", variable), value.indices)
        kept = ops.where(mask, value.values, ops.cast(old, value.values.dtype))
        return tf.IndexedSlices(kept, value.indices, value.dense_shape)
    return ops.where(mask, value, ops.cast(variable, value.dtype))


def zero_unless(mask, value):
    """`value` where `mask` holds, else zero (for `assign_add`/`assign_sub`).

    A product, not a select: XLA then updates the variable in place (a select
    kept a second buffer per variable: +500 MB on 16.8M Adam parameters). The
    value must be finite, so the optimizer zeroes a non-finite gradient first.
    """
    if _is_sparse(value):
        import tensorflow as tf

        zeroed = ops.where(mask, value.values, ops.zeros_like(value.values))
        return tf.IndexedSlices(zeroed, value.indices, value.dense_shape)
    value = ops.convert_to_tensor(value)
    return value * ops.cast(mask, value.dtype)


def read(variable):
    """The current value of a Keras or backend variable, as a tensor."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return ops.convert_to_tensor(variable)


def dense_values(gradient):
    """A gradient's values, and a function to put new values back.

    A `tf.IndexedSlices` (its indices already unique, see `split_sparse`)
    gives its rows; a dense gradient is its own value.
    """
    if not _is_sparse(gradient):
        return gradient, lambda values: values
    import tensorflow as tf

    def rewrap(values):
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)

    return gradient.values, rewrap


def split_sparse(grads):
    """Dense stand-ins for sparse gradients, and a function to rewrap them.

    A `tf.IndexedSlices` gradient (from `Embedding`) may repeat an index; the
    repeats are summed first, so the values hold exactly the non-zero rows of
    the dense gradient: norms, element clipping and scaling of the values are
    those of the dense gradient, and the result stays sparse.
    """
    if keras.backend.backend() != "tensorflow":
        return list(grads), lambda values: list(values)
    import tensorflow as tf

    sparse = {}
    values = []
    for i, g in enumerate(grads):
        if isinstance(g, tf.IndexedSlices):
            unique, position = tf.unique(g.indices)
            summed = tf.math.unsorted_segment_sum(
                g.values, position, tf.shape(unique)[0]
            )
            sparse[i] = (unique, g.dense_shape)
            values.append(summed)
        else:
            values.append(g)

    def rewrap(new_values):
        out = list(new_values)
        for i, (indices, dense_shape) in sparse.items():
            out[i] = tf.IndexedSlices(out[i], indices, dense_shape)
        return out

    return values, rewrap


# tf.distribute: clipping after the all-reduce (DESIGN.md, step contract 1).


def has_strategy():
    """Whether a `tf.distribute` strategy (other than the default) is in scope."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def replica_context():
    """The replica context when several replicas train in sync, else `None`.

    Only TensorFlow's `tf.distribute` has replicas inside the step; under one
    device (or the default strategy) the plain path is used.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def all_reduce_sum(context, grads):
    """Sums the gradients across replicas: every replica gets the full sum."""
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))


def merge_call(context, fn, *args):
    """Runs `fn(distribution, *args)` once, in cross-replica context."""
    return context.merge_call(fn, args=args)


def cross_replica_assign(distribution, variable, value):
    """Assigns each replica's copy of `variable` its replica's `value`."""
    target = getattr(variable, "value", variable)
    distribution.extended.update(
        target, lambda var, x: var.assign(x), args=(value,), group=False
    )


def cross_replica_decay(distribution, variable, weight_decay, learning_rate):
    """Keras's decoupled weight decay, `w <- w - w * wd * lr`, per replica."""
    import tensorflow as tf

    def decay(var):
        wd = tf.cast(weight_decay, var.dtype)
        var.assign_sub(var * wd * tf.cast(learning_rate, var.dtype))

    distribution.extended.update(variable.value, decay, group=False)


class UpdateChain:
    """Makes XLA update the variables in order, two at a time.

    XLA's CPU scheduler runs independent work as early as it can: every
    variable's first update fusion, then every second one, so each fusion
    reads from memory what an earlier one wrote long before. Passing each
    gradient through a select on a predicate that is always false but that
    XLA cannot fold (`w0 != w0 and w0 == w0`, with `w0` an earlier variable's
    new first element) makes it wait for that update and keeps one
    variable's fusions together, while its slots are in cache. The gradient
    comes through bit for bit, and the update's arithmetic is untouched (a
    multiply by one changed how LLVM fused Lion's multiply-adds).

    Each variable waits for the one `lanes` places before it, not the one
    right before: with two lanes XLA runs one variable's fusion while the
    other's waits for its threads (with one lane, a thread taken by another
    process stalls the whole update; measurements in benchmarks/README.md).
    """

    def __init__(self, lanes=2):
        self._lanes = [None] * lanes
        self._count = 0

    def after_previous(self, gradient):
        """`gradient`, made to wait for the variable `lanes` places before it."""
        never = self._lanes[self._count % len(self._lanes)]
        if never is None or keras.backend.backend() != "tensorflow":
            return gradient
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices):
            values = self.after_previous(gradient.values)
            return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
        return tf.where(never, -gradient, gradient)

    def link(self, variable, *scalars):
        """Makes the variable `lanes` places later wait for `variable`'s new value.

        It also waits for `scalars` (e.g. a sum over this variable's
        gradient): XLA then computes them while that gradient is in cache.
        """
        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        lane = self._count % len(self._lanes)
        self._count += 1
        value = read(variable)
        if value.shape.num_elements() == 0:  # the lane keeps its last wait
            return
        never = None
        for x in [tf.reshape(value, [-1])[0], *scalars]:
            cut = opaque_false(x)
            never = cut if never is None else tf.logical_and(never, cut)
        self._lanes[lane] = never


def opaque_false(x):
    """False, but XLA cannot know it: `x != x and x == x` (TensorFlow)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    return tf.logical_and(tf.not_equal(x, x), tf.equal(x, x))


# Keras's training loop: what keras-clip adds to the loss it logs and to the
# optimizer Keras wraps under mixed precision.


def filter_nonfinite_loss(model):
    """Makes the loss Keras logs leave out batches whose loss is NaN or Inf.

    Keras logs `loss` as a running mean (`model._loss_tracker`, a
    `keras.metrics.Mean` updated in the train step before the optimizer
    runs): one NaN batch makes it NaN for the rest of the epoch, even when
    the optimizer skipped that step. Filtered, the tracker adds a non-finite
    batch with weight 0, and its result is NaN only while no batch of the
    epoch so far had a finite loss (Keras's `Mean` would report 0 there).

    The train function must be traced after this; if the model already has
    one, it is dropped, so that `fit` makes a new one.

    Returns:
        Whether the model changed (False if it was filtered already or has
        no loss tracker yet).
    """
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None or getattr(tracker, "_keras_clip_finite", False):
        return False
    update_state, result = tracker.update_state, tracker.result

    def finite_update_state(values, sample_weight=None):
        values = ops.convert_to_tensor(values)
        finite = ops.all(ops.isfinite(values))
        weight = ops.cast(finite, values.dtype)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, values.dtype) * weight
        update_state(ops.where(finite, values, ops.zeros_like(values)), weight)

    def finite_result():
        return ops.where(
            tracker.count > 0, result(), ops.full((), float("nan"), tracker.dtype)
        )

    tracker.update_state = finite_update_state
    tracker.result = finite_result
    tracker._keras_clip_finite = True
    if getattr(model, "train_function", None) is not None:
        model.train_function = None
    return True


def forward_gradient_stats(loss_scale_optimizer_class):
    """Gives `LossScaleOptimizer` the statistics methods of its inner optimizer.

    Keras wraps the optimizer of every `mixed_float16` model in a
    `LossScaleOptimizer`, so `model.optimizer.gradient_stats()` must reach the
    keras-clip optimizer inside. Adds `gradient_stats` and
    `gradient_norms_by_variable`, which delegate to `inner_optimizer`, unless
    the class has them already.
    """

    def forward(name):
        def method(self, *args, **kwargs):
            inner = self.inner_optimizer
            if not hasattr(inner, name):
                raise AttributeError(
                    f"`{name}()` needs a keras-clip optimizer inside the "
                    "`LossScaleOptimizer`, e.g. `keras_clip.ClippedAdam`. "
                    f"Received: inner_optimizer={inner!r}"
                )
            return getattr(inner, name)(*args, **kwargs)

        method.__name__ = name
        method.__doc__ = f"The inner optimizer's `{name}()` (added by keras-clip)."
        return method

    for name in ("gradient_stats", "gradient_norms_by_variable"):
        if not hasattr(loss_scale_optimizer_class, name):
            setattr(loss_scale_optimizer_class, name, forward(name))
