"""TensorFlow's pieces: `tf.cond`, `tf.IndexedSlices`, `tf.distribute`, XLA.

Only called when Keras runs on TensorFlow (see `keras_clip/backend/__init__.py`).
"""

import contextlib
import math

import keras
import tensorflow as tf


def run_if(pred, fn, fallback):
    """`fn()` (which may assign variables) where `pred` holds: one `tf.cond`."""
    return tf.cond(pred, fn, fallback)


def read(variable):
    """One read of `variable` (Keras's `convert_to_tensor` passes a
    `tf.Variable` through, to be read again at each use)."""
    return tf.convert_to_tensor(variable)


def bincount(index, length):
    # A constant size compiles under XLA, also inside the step's `cond`
    # (`tf.math.bincount` and `ops.bincount` derive the size from the data,
    # which XLA cannot always resolve there), and runs 2-4x faster than a
    # segment sum on CPU.
    return tf.raw_ops.DenseBincount(
        input=index,
        size=tf.constant(length, index.dtype),
        weights=tf.zeros((0,), "int32"),
    )


def reader(values, then_zero):
    """`backend.reader` as one call of a traced function: on TensorFlow each
    eager read or assignment costs tens of microseconds. The traced graph is
    called directly (its `ConcreteFunction`): a `tf.function`'s own call
    would look its trace up again at every read."""

    @tf.function(autograph=False)
    def read():
        out = tf.stack([tf.cast(x, tf.float64) for x in values()])
        for variable in then_zero:  # (after the reads: program order)
            variable.assign(tf.zeros(variable.shape, variable.dtype))
        return out

    traced = read.get_concrete_function()
    return lambda: traced().numpy()


# Sparse gradients (`Embedding`).


def is_sparse(value):
    return isinstance(value, tf.IndexedSlices)


def unique_rows(gradient):
    """A `tf.IndexedSlices` with its repeated indices summed: `(values, indices)`."""
    unique, position = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(
        gradient.values, position, tf.shape(unique)[0]
    )
    return values, unique


def sparse(values, indices, like):
    return tf.IndexedSlices(values, indices, like.dense_shape)


def gather(variable, indices):
    return tf.gather(variable, indices)


# tf.distribute: clipping after the all-reduce (DESIGN.md, step contract 1).


def has_strategy():
    return tf.distribute.has_strategy()


def replica_context():
    """The replica context when several replicas train in sync, else `None`."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def all_reduce_sum(context, grads):
    """Sums the gradients across replicas: every replica gets the full sum."""
    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))


def cross_replica_assign(distribution, variable, value):
    """Assigns each replica's copy of `variable` its replica's `value`."""
    target = getattr(variable, "value", variable)
    distribution.extended.update(
        target, lambda var, x: var.assign(x), args=(value,), group=False
    )


def cross_replica_decay(distribution, variable, weight_decay, learning_rate):
    """Keras's decoupled weight decay, `w <- w - w * wd * lr`, per replica.

    (Keras's own `_apply_weight_decay` needs a replica context to merge
    from; the distributed step decays in cross-replica context.)
    """

    def decay(var):
        wd = tf.cast(weight_decay, var.dtype)
        var.assign_sub(var * wd * tf.cast(learning_rate, var.dtype))

    distribution.extended.update(variable.value, decay, group=False)


# XLA's order of the updates.


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

    # A variable under this many elements is not ordered: its update (the
    # gradient, the weight and two slots: under 1 MB in float32) stays in
    # cache anyway, and the wait would serialize kernels whose fixed cost,
    # not the memory, sets their time.
    MIN_SIZE = 1 << 16

    def orders(self, variable):
        """Whether `variable`'s update is ordered (see `MIN_SIZE`)."""
        shape = tuple(variable.shape)
        return None not in shape and math.prod(shape) >= self.MIN_SIZE

    def after_previous(self, value):
        """`value`, made to wait for the variable `lanes` places before it."""
        never = self._lanes[self._count % len(self._lanes)]
        if never is None:
            return value
        if isinstance(value, tf.IndexedSlices):
            values = self.after_previous(value.values)
            return tf.IndexedSlices(values, value.indices, value.dense_shape)
        return tf.where(never, -value, value)

    def link(self, variable, *scalars):
        """Makes the variable `lanes` places later wait for `variable`'s new value.

        It also waits for `scalars` (e.g. a sum over this variable's
        gradient): XLA then computes them while that gradient is in cache.
        """
        lane = self._count % len(self._lanes)
        self._count += 1
        if isinstance(variable, keras.Variable):
            variable = variable.value
        value = tf.convert_to_tensor(variable)
        if value.shape.num_elements() == 0:  # the lane keeps its last wait
            return
        never = None
        for x in [tf.reshape(value, [-1])[0], *scalars]:
            cut = opaque_false(x)
            never = cut if never is None else tf.logical_and(never, cut)
        self._lanes[lane] = never


@contextlib.contextmanager
def outside_traces(variables):
    """`backend.outside_traces`: variables created eagerly (`tf.init_scope`)
    and not lifted, so the function being traced does not count them as its
    own (it traces again when it made some).

    Only when `variables` hold their values already (when the model's own
    variables are made in this trace, it is traced again anyway, and a build
    may read them: `ScheduleFreeAdamW` copies them), and without a
    distribution strategy (under one, Keras builds the optimizer before
    tracing)."""
    if tf.executing_eagerly() or tf.distribute.has_strategy():
        yield
        return
    with tf.init_scope():
        ready = all(bool(_tf_variable(v).is_initialized()) for v in variables)
    if not ready:
        yield
        return

    def not_lifted(next_creator, **kwargs):
        kwargs["experimental_enable_variable_lifting"] = False
        return next_creator(**kwargs)

    with tf.variable_creator_scope(not_lifted), tf.init_scope():
        yield


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def compiled_by_xla():
    """Whether the function being traced is compiled by XLA (`jit_compile=True`)."""
    from tensorflow.python.ops import control_flow_util

    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def opaque_false(x):
    """False, but XLA cannot know it: `x != x and x == x`."""
    x = tf.convert_to_tensor(x)
    return tf.logical_and(tf.not_equal(x, x), tf.equal(x, x))
