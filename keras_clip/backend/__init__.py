"""Every backend-specific piece and every private Keras name keras-clip uses.

The rest of the package is `keras.ops` and public Keras API; what it cannot
be lives here, so that a Keras release that moves an internal breaks this
package and its guard test (tests/test_backend.py), not the optimizer:

- `optimizer`: the Keras optimizer internals: the hooks keras-clip
  overrides, the private names it calls, and how a step's updates run.
- `training`: the Keras training-loop internals (the logged loss, the
  mixed-precision wrapper).
- `tensorflow`: TensorFlow's `tf.cond`, `tf.IndexedSlices`,
  `tf.distribute` and XLA ordering.

This module holds the functions whose backends differ.
"""

import contextlib

import keras
import numpy as np
from keras import ops
from keras import tree


def _tf():
    """`keras_clip.backend.tensorflow` when Keras runs on TensorFlow, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_clip.backend import tensorflow

    return tensorflow


def keras_optimizers(*names):
    """The classes among `keras.optimizers.<name>` this Keras has, as a tuple
    for `isinstance` (`MultiOptimizer` came with Keras 3.15)."""
    return tuple(
        getattr(keras.optimizers, name)
        for name in names
        if hasattr(keras.optimizers, name)
    )


def run_if(pred, fn, fallback, protect):
    """Runs `fn()` where `pred` is true and `fallback()` where it is false.

    Either may assign variables; both return the same structure of tensors.
    On TensorFlow this is one `tf.cond`, on torch (eager) a Python `if`.
    JAX's stateless tracing cannot assign inside a `cond`: both run, and
    every variable in `protect` (all that either assigns) ends up with the
    value of the branch `pred` picks.
    """
    tf = _tf()
    if tf is not None:
        return tf.run_if(pred, fn, fallback)
    if keras.backend.backend() != "jax":
        return ops.cond(pred, fn, fallback)
    old = [v.value for v in protect]
    out = fn()
    taken = [v.value for v in protect]
    for v, o in zip(protect, old):
        v.assign(o)
    other = fallback()
    for v, t in zip(protect, taken):
        v.assign(ops.where(pred, t, v.value))
    return tree.map_structure(lambda a, b: ops.where(pred, a, b), out, other)


def bincount(index, length):
    """How many entries of the int32 `index` hold each value in `[0, length)`.

    Of fixed length, so it compiles with XLA, also inside `run_if`.
    """
    tf = _tf()
    if tf is not None:
        return tf.bincount(index, length)
    return ops.segment_sum(ops.ones_like(index), index, num_segments=length)


def read(variable):
    """The current value of a Keras or backend variable, as a tensor.

    On TensorFlow a variable is read again wherever it is used; the tensor
    is one read, however often the step uses it (a threshold used once per
    gradient: one read, not one a gradient).
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    tf = _tf()
    if tf is not None:
        return tf.read(variable)
    return ops.convert_to_tensor(variable)


# Sparse gradients: a `tf.IndexedSlices` (from `Embedding`) stands for the
# dense gradient; keras-clip clips its rows and keeps it sparse.


def is_sparse(value):
    tf = _tf()
    return tf is not None and tf.is_sparse(value)


def split_sparse(grads):
    """Dense stand-ins for sparse gradients, and a function to rewrap them.

    A sparse gradient may repeat an index; the repeats are summed first, so
    the values hold exactly the non-zero rows of the dense gradient: norms,
    element clipping and scaling of the values are those of the dense
    gradient, and the result stays sparse.
    """
    grads = [_tensor(g) for g in grads]
    tf = _tf()
    if tf is None:
        return grads, lambda values: list(values)
    rows = {}
    values = []
    for i, g in enumerate(grads):
        if tf.is_sparse(g):
            summed, indices = tf.unique_rows(g)
            rows[i] = (indices, g)
            values.append(summed)
        else:
            values.append(g)

    def rewrap(new_values):
        out = list(new_values)
        for i, (indices, like) in rows.items():
            out[i] = tf.sparse(out[i], indices, like)
        return out

    return values, rewrap


def _tensor(x):
    """NumPy input as a tensor (NumPy arrays and torch tensors do not mix in
    Python operators); anything else as it is."""
    return ops.convert_to_tensor(x) if isinstance(x, (np.ndarray, np.generic)) else x


def dense_values(gradient):
    """A gradient's values, and a function to put new values back.

    A sparse gradient (its indices already unique, see `split_sparse`) gives
    its rows; a dense gradient is its own value.
    """
    if not is_sparse(gradient):
        return gradient, lambda values: values
    tf = _tf()
    return gradient.values, lambda values: tf.sparse(values, gradient.indices, gradient)


def keep_unless(mask, value, variable):
    """`value` where `mask` holds, else the variable's current value."""
    if is_sparse(value):
        tf = _tf()
        old = tf.gather(read(variable), value.indices)
        kept = ops.where(mask, value.values, ops.cast(old, value.values.dtype))
        return tf.sparse(kept, value.indices, value)
    return ops.where(mask, value, ops.cast(read(variable), value.dtype))


def zero_unless(mask, value):
    """`value` where `mask` holds, else zero (for `assign_add`/`assign_sub`).

    A product, not a select: XLA then updates the variable in place (a select
    kept a second buffer per variable: +500 MB on 16.8M Adam parameters). The
    value must be finite, so the optimizer zeroes a non-finite gradient first.
    """
    if is_sparse(value):
        zeroed = ops.where(mask, value.values, ops.zeros_like(value.values))
        return _tf().sparse(zeroed, value.indices, value)
    value = ops.convert_to_tensor(value)
    return value * ops.cast(mask, value.dtype)


# Replicas: only TensorFlow's `tf.distribute` has them inside the step.


def replica_context():
    """The replica context when several replicas train in sync, else `None`."""
    tf = _tf()
    return None if tf is None else tf.replica_context()


def all_reduce_sum(context, grads):
    """Sums the gradients across the replicas of `context`."""
    return _tf().all_reduce_sum(context, grads)


def check_one_process():
    """Raises under `torch.distributed` with several processes.

    Keras's `fit` on torch trains in one process; with several, nothing
    tells keras-clip whether the gradients it gets were summed across the
    processes first (DistributedDataParallel does, a plain loop does not),
    and clipping each process's part would be silently wrong.
    """
    if keras.backend.backend() != "torch":
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError(
            "keras-clip on torch supports one process: with several "
            "(torch.distributed), it cannot know whether the gradients were "
            "summed across processes before clipping. Train in one process, "
            "or use the JAX backend with keras.distribution.DataParallel or "
            "TensorFlow with tf.distribute. "
            f"Received: world_size={dist.get_world_size()}"
        )


def has_strategy():
    """Whether a `tf.distribute` strategy (other than the default) is in scope."""
    tf = _tf()
    return tf is not None and tf.has_strategy()


def sums_by_matvec():
    """Whether a large tensor's sums run faster as a matrix-vector product:
    on TensorFlow, whose XLA reduces on one thread; not on JAX, whose XLA
    reduces faster than it multiplies (the product's input, the squares, is
    then a tensor in memory: the step took 2.8 times Adam's), nor torch."""
    return keras.backend.backend() == "tensorflow"


class UpdateChain:
    """Orders the updates for the cache (see `tensorflow.UpdateChain`); a
    no-op off TensorFlow."""

    def __new__(cls, lanes=2):
        tf = _tf()
        if tf is not None:
            return tf.UpdateChain(lanes)
        return super().__new__(cls)

    def orders(self, variable):
        return False

    def after_previous(self, value):
        return value

    def link(self, variable, *scalars):
        pass


def bitcast(x, dtype):
    """`x`'s bits as a tensor of `dtype`, of the same width (exact: no
    arithmetic reads them)."""
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.bitcast(x, dtype)
    if name == "jax":
        import jax

        return jax.lax.bitcast_convert_type(x, dtype)
    import torch

    return x.view(getattr(torch, dtype))


def host_value(variable):
    """`variable`'s value as a NumPy array, in one read (on TensorFlow,
    `ops.convert_to_numpy` takes about twice as long)."""
    if _tf() is not None:
        return variable.value.numpy()
    return ops.convert_to_numpy(variable.value)


def reader(values, then_zero=()):
    """A function that computes the scalars `values()` returns (reads of
    variables) as one float64 NumPy vector, in one host read, and then sets
    the variables `then_zero` to zero (outside steps)."""
    tf = _tf()
    if tf is not None:
        return tf.reader(values, then_zero)

    def read():
        out = np.array([float(ops.convert_to_numpy(x)) for x in values()])
        for variable in then_zero:
            variable.assign(ops.zeros(variable.shape, variable.dtype))
        return out

    return read


def outside_traces(variables):
    """A context in which variables are created as if before any step.

    Keras on TensorFlow builds the optimizer inside the first trace of its
    train step (unless a distribution strategy builds it first); a
    `tf.function` that creates variables in its first trace is traced a
    second time, so `fit`'s first call would trace the step twice. Created
    here, the optimizer's variables come from eager code and the first trace
    is the only one, provided the model's `variables` exist before it.
    Elsewhere a no-op.
    """
    tf = _tf()
    return contextlib.nullcontext() if tf is None else tf.outside_traces(variables)


def compiled_by_xla(x):
    """Whether `x` belongs to a function XLA compiles: on TensorFlow one
    traced under `jit_compile=True`, on JAX one traced by `jax.jit` (Keras's
    steps, unless `jit_compile=False`), on torch none."""
    tf = _tf()
    if tf is not None:
        return tf.compiled_by_xla()
    if keras.backend.backend() == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    return False


def opaque_false(x):
    """False, but XLA cannot know it (see `UpdateChain`)."""
    return _tf().opaque_false(x)


from keras_clip.backend.optimizer import OptimizerHooks  # noqa: E402
from keras_clip.backend.optimizer import trainable_variables  # noqa: E402
from keras_clip.backend.optimizer import updates_for  # noqa: E402
from keras_clip.backend.optimizer import variable_index  # noqa: E402
from keras_clip.backend.training import filter_nonfinite_loss  # noqa: E402
from keras_clip.backend.training import forward_gradient_stats  # noqa: E402
