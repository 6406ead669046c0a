"""Pure clipping math on lists of gradient tensors (`keras.ops` only).

Every function takes a list of tensors (entries may be `None`, which pass
through), accumulates norms in float32 whatever the gradient dtype, and scales
exactly: a tensor already inside its bound comes back unchanged, an all-zero
tensor stays zero and nothing divides 0 by 0.

A sparse gradient (a `tf.IndexedSlices`, from `Embedding`) is taken as the
dense gradient it stands for: its repeated indices are summed first
(`backend.split_sparse`), so norms are those of the dense gradient, value
clipping clips the dense gradient's elements, and a clipped gradient comes
back sparse, with unique indices.
"""

import keras
import numpy as np
from keras import ops

from keras_clip import backend


# Whole-tensor sums of at least this many elements are taken as a
# matrix-vector product on TensorFlow: XLA's CPU reductions run on one thread
# there, its dots do not (faster on large tensors, and more accurate;
# benchmarks/README.md). Smaller tensors are summed in groups (`tensor_sums`).
_MATVEC_MIN_SIZE = 1 << 16
# The product's rows: 256 elements for one sum; several sums stacked per row
# run faster on rows of 1024 (one sum takes the same time either way).
_MATVEC_WIDTH = 256
_MATVEC_WIDTH_STACKED = 1024


def _matvec_rows(x, width):
    """`x` as rows of `width` elements, or `None` off the matrix-vector path
    (see `backend.sums_by_matvec`)."""
    if not backend.sums_by_matvec():
        return None
    size = _static_size(x)
    if size is None or size < _MATVEC_MIN_SIZE or size % width:
        return None
    return ops.reshape(x, (-1, width))


def _sq_norm(x, axis=None, keepdims=False):
    """Sum of squares of `x` in float32."""
    x = ops.square(ops.cast(x, "float32"))
    rows = None if axis is not None else _matvec_rows(x, _MATVEC_WIDTH)
    if rows is not None:
        total = ops.sum(ops.matmul(rows, ops.ones((_MATVEC_WIDTH,), "float32")))
        return ops.reshape(total, (1,) * len(x.shape)) if keepdims else total
    return ops.sum(x, axis=axis, keepdims=keepdims)


def _square(x):
    return ops.square(ops.cast(x, "float32"))


def sum_of_squares(grads):
    """Each tensor's sum of squares, accumulated in float32.

    ```
    sum_of_squares(g)[i] = sum(g_i ** 2)
    ```

    Args:
        grads: List of tensors (no `None`).

    Returns:
        A float32 vector, one entry per tensor.

    Example:

    >>> np.asarray(sum_of_squares([np.array([3.0]), np.array([1.0, 2.0])])).tolist()
    [9.0, 5.0]
    """
    return tensor_sums(grads)[:, 0]


def tensor_sums(grads, fns=()):
    """Each tensor's sum of squares, and its sums of other elementwise
    functions, in one pass.

    ```
    tensor_sums(g, fns)[i, 0]     = sum(g_i ** 2)
    tensor_sums(g, fns)[i, 1 + j] = sum(fns[j](g_i))
    ```

    All in float32: each function maps a tensor (in its own dtype) to a
    tensor of its shape, whose values are cast to float32 and summed. A
    tensor's sums are taken together: on large tensors as one matrix-vector
    product, which reads the tensor once (XLA's CPU reductions run on one
    thread, its dots do not; see `_MATVEC_MIN_SIZE`).

    Args:
        grads: List of tensors (no `None`).
        fns: Sequence of elementwise functions. Defaults to none.

    Returns:
        A float32 matrix of shape `(len(grads), 1 + len(fns))`.

    Example:

    >>> sums = tensor_sums([np.array([3.0, -1.0])], [lambda g: g > 0])
    >>> np.asarray(sums).tolist()
    [[10.0, 1.0]]
    """
    fns = (_square, *fns)
    if not grads:
        return ops.zeros((0, len(fns)), "float32")
    blocks, order = [], []
    for group in _size_groups(grads):
        if _small(grads[group[0]]):
            # Small tensors of one size and dtype as the rows of one matrix:
            # one reduction for all (a kernel's fixed cost, not the memory,
            # sets a small tensor's time).
            block = ops.stack([ops.reshape(grads[i], (-1,)) for i in group])
            blocks.append(ops.stack(
                [ops.sum(ops.cast(fn(block), "float32"), axis=1) for fn in fns], axis=1
            ))
        else:
            blocks.append(ops.stack(_sums(grads[group[0]], fns))[None])
        order += group
    sums = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks)
    if order == list(range(len(grads))):
        return sums
    row_of = [0] * len(grads)  # each tensor's row among the blocks
    for row, i in enumerate(order):
        row_of[i] = row
    return ops.take(sums, row_of, axis=0)


def _static_size(x):
    """The number of elements of `x`, or `None` if its shape is not static."""
    size = 1
    for dim in x.shape:
        if not isinstance(dim, int):
            return None
        size *= dim
    return size


def _small(x):
    """Whether `x` has a static size under `_MATVEC_MIN_SIZE`."""
    size = _static_size(x)
    return size is not None and size < _MATVEC_MIN_SIZE


def _size_groups(grads):
    """Indices of `grads` in groups: the small tensors (`_small`) of one size
    and dtype together, in order of first appearance; every other alone."""
    return _groups([
        (_static_size(g), keras.backend.standardize_dtype(g.dtype)) if _small(g) else None
        for g in grads
    ])


def _groups(keys):
    """Indices in groups of one key, in order of first appearance; an index
    whose key is `None` alone."""
    groups, by_key = [], {}
    for i, key in enumerate(keys):
        if key is None:
            groups.append([i])
        elif key in by_key:
            by_key[key].append(i)
        else:
            by_key[key] = [i]
            groups.append(by_key[key])
    return groups


def _sums(x, fns):
    """The float32 sum of `fn(x)` for each elementwise `fn`, in one pass.

    On the matrix-vector path (see `_sq_norm`) all sums are taken by one
    product, which reads `x` once: three sums take 5% longer than one.
    """
    values = [ops.cast(fn(x), "float32") for fn in fns]
    widths = (
        (_MATVEC_WIDTH,) if len(values) == 1
        else (_MATVEC_WIDTH_STACKED, _MATVEC_WIDTH)
    )
    for width in widths:
        rows = [_matvec_rows(v, width) for v in values]
        if rows[0] is not None:
            sums = ops.matmul(ops.stack(rows, axis=1), ops.ones((width,), "float32"))
            return list(ops.unstack(ops.sum(sums, axis=0)))
    return [ops.sum(v) for v in values]


def clip_scale(norm, max_norm):
    """The factor that clips `norm` to `max_norm`: `min(1, max_norm / norm)`.

    ```
    clip_scale(n, c) = c / n   where n > c
                       1       elsewhere (n <= c, and n NaN)
    ```

    Exactly 1 inside the bound, so scaling by it returns a tensor bit for
    bit; no division of 0 by 0 (a two-sided `where`, no Python branch).
    Element-wise: `norm` and `max_norm` broadcast.

    Args:
        norm: Float tensor of norms.
        max_norm: Positive float tensor or number.

    Returns:
        A tensor of factors of `norm`'s shape and dtype.

    Example:

    >>> np.asarray(clip_scale(np.array([0.0, 0.5, 4.0]), 2.0)).tolist()
    [1.0, 1.0, 0.5]
    """
    norm = ops.convert_to_tensor(norm)
    over = norm > max_norm
    safe_norm = ops.where(over, norm, ops.ones_like(norm))
    return ops.where(over, max_norm / safe_norm, ops.ones_like(norm))


def entries(vector):
    """The entries of a 1-D tensor of static length, as a list of scalars.

    ```
    entries(v)[i] = v[i]
    ```

    Under XLA each entry is a masked sum over the vector, not a slice. XLA
    fuses a slice into every kernel that reads it, index and all, so each
    small tensor scaled by its own entry gets update kernels that no other
    tensor shares, and XLA compiles each one separately (per-tensor rules
    on 82 small variables: 164 more kernels to compile, the first call up
    to 1.5x Adam's). A masked sum is a small kernel of its own, and
    same-shaped tensors share their update kernels again. Exact: the sum
    adds zeros to the entry. Without XLA, where each operation is a kernel
    anyway, the entries are slices (one operation each, not two).

    Example:

    >>> [float(x) for x in entries(np.array([2.0, -1.0, np.inf]))]
    [2.0, -1.0, inf]
    """
    vector = ops.convert_to_tensor(vector)
    n = vector.shape[0]
    if not backend.compiled_by_xla(vector):
        return list(ops.unstack(vector))
    zero = ops.zeros((), vector.dtype)
    rows = np.eye(n, dtype=bool)
    return [ops.sum(ops.where(rows[i], vector, zero)) for i in range(n)]


def scale(grads, factors):
    """Multiplies each tensor by its factor, in the tensor's own dtype.

    ```
    scale(g, f)[i] = g_i * f_i      (or g_i * f for one scalar f)
    ```

    Args:
        grads: List of tensors; `None` entries pass through.
        factors: One scalar for all tensors, or one factor per tensor (a
            list, or a vector of `len(grads)`); a factor may also be a tensor
            that broadcasts against its gradient (e.g. one per unit).

    Returns:
        The list of scaled tensors.

    Example:

    >>> [np.asarray(g).tolist() for g in scale([np.array([2.0]), np.array([4.0])], [0.5, 1.0])]
    [[1.0], [4.0]]
    """
    values, rewrap = backend.split_sparse(grads)
    if not isinstance(factors, (list, tuple)):
        factors = ops.convert_to_tensor(factors)
        factors = (
            [factors] * len(values) if len(factors.shape) == 0
            else entries(factors)
        )
    return rewrap([
        None if g is None else g * ops.cast(f, g.dtype)
        for g, f in zip(values, factors)
    ])


def _split(grads):
    """`backend.split_sparse`, plus each entry's row indices (`None` if dense)."""
    values, rewrap = backend.split_sparse(grads)
    wrapped = rewrap(values)
    indices = [None if w is v else w.indices for w, v in zip(wrapped, values)]
    return values, indices, rewrap


def global_norm(grads):
    """Global L2 norm of a list of tensors, accumulated in float32.

    ```
    global_norm(g) = sqrt(sum_i sum(g_i ** 2))
    ```

    Args:
        grads: List of tensors; `None` entries are ignored.

    Returns:
        A float32 scalar.

    Example:

    >>> float(global_norm([np.array([3.0]), np.array([4.0])]))
    5.0
    """
    values, _ = backend.split_sparse(grads)
    sq = [_sq_norm(g) for g in values if g is not None]
    if not sq:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(sq)))


def clip_by_value(grads, max_value):
    """Clips every element to `[-max_value, max_value]`.

    ```
    g <- clip(g, -max_value, max_value)
    ```

    Args:
        grads: List of tensors; `None` entries pass through.
        max_value: Positive scalar.

    Returns:
        The list of clipped tensors.

    Example:

    >>> [np.asarray(g).tolist() for g in clip_by_value([np.array([-3.0, 0.5])], 1.0)]
    [[-1.0, 0.5]]
    """
    values, rewrap = backend.split_sparse(grads)
    bounds = {}  # dtype -> (-c, c), computed once for all tensors of a dtype
    out = []
    for g in values:
        if g is None:
            out.append(None)
            continue
        if g.dtype not in bounds:
            c = ops.cast(max_value, g.dtype)
            bounds[g.dtype] = (-c, c)
        out.append(ops.clip(g, *bounds[g.dtype]))
    return rewrap(out)


def clip_by_norm(grads, max_norm):
    """Clips each tensor on its own so that its L2 norm is at most `max_norm`.

    ```
    g_i <- g_i * min(1, max_norm / ||g_i||)
    ```

    Args:
        grads: List of tensors; `None` entries pass through.
        max_norm: Positive scalar.

    Returns:
        The list of clipped tensors.

    Example:

    >>> clipped = clip_by_norm([np.array([3.0, 4.0])], 1.0)
    >>> [[round(float(v), 6) for v in np.asarray(g)] for g in clipped]
    [[0.6, 0.8]]
    """
    values, rewrap = backend.split_sparse(grads)
    max_norm = ops.cast(max_norm, "float32")
    return rewrap([
        None if g is None else g * ops.cast(clip_scale(ops.sqrt(_sq_norm(g)), max_norm), g.dtype)
        for g in values
    ])


def clip_by_global_norm(grads, max_norm):
    """Scales all tensors by one factor so their global norm is <= `max_norm`.

    ```
    n = global_norm(g)
    g_i <- g_i * min(1, max_norm / n)
    ```

    Args:
        grads: List of tensors; `None` entries pass through.
        max_norm: Positive scalar.

    Returns:
        A tuple `(clipped, norm)`: the clipped list and the global norm before
        clipping (float32).

    Example:

    >>> clipped, norm = clip_by_global_norm([np.array([3.0]), np.array([4.0])], 1.0)
    >>> float(norm), [round(float(g[0]), 6) for g in clipped]
    (5.0, [0.6, 0.8])
    """
    values, rewrap = backend.split_sparse(grads)
    norm = global_norm(values)
    factor = clip_scale(norm, ops.cast(max_norm, "float32"))
    return scale(rewrap(values), factor), norm


def _unit_axes(ndim, axis):
    if axis is not None:
        return axis
    if ndim <= 1:
        return None
    return tuple(range(ndim - 1))


def _units_span_rows(ndim, axis):
    """Whether each unit reduces over axis 0, the rows of a sparse gradient.

    Then the rows a sparse gradient leaves out add nothing to any unit's sum,
    and its stored rows give the dense gradient's unit norms; otherwise each
    unit lies within one row.
    """
    axes = _unit_axes(ndim, axis)
    if axes is None:
        return True
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return any(a % ndim == 0 for a in axes)


def unitwise_norm(x, axis=None):
    """L2 norm of each unit of `x` in Keras's kernel layout, in float32.

    A unit is one slice along the last axis: a Dense kernel `(in, out)` has
    `out` units, a Conv2D kernel `(h, w, in, out)` has `out` units, each norm
    taken over all the other axes. Scalars and vectors are one unit.

    Args:
        x: A tensor.
        axis: Optional int or tuple of ints, the axes to reduce over. Defaults
            to `None`: every axis but the last for rank >= 2, all axes for
            scalars and vectors.

    Returns:
        A float32 tensor of norms with the reduced axes kept (size 1), so it
        broadcasts against `x`.

    Example:

    >>> np.asarray(unitwise_norm(np.array([[3.0, 0.0], [4.0, 1.0]]))).tolist()
    [[5.0, 1.0]]
    """
    (values,), (indices,), _ = _split([x])
    ndim = len(x.shape)
    if indices is None or _units_span_rows(ndim, axis):
        return ops.sqrt(_unitwise_sq_norm(values, axis))
    # Each unit lies within one row: the absent rows' units have norm 0.
    norms = ops.sqrt(_unitwise_sq_norm(values, axis))
    shape = (x.shape[0], *norms.shape[1:])
    return ops.scatter(ops.expand_dims(indices, -1), norms, shape)


def _unitwise_sq_norm(x, axis=None):
    """Each unit's sum of squares (see `unitwise_norm`), reduced axes kept."""
    return _sq_norm(x, axis=_unit_axes(len(x.shape), axis), keepdims=True)


def adaptive_clip_scale(grad, param, clip_factor=0.01, epsilon=1e-3, axis=None,
                        grad_square=None):
    """AGC's factor for each unit of one gradient (see `adaptive_grad_clip`).

    ```
    scale_i = min(1, clip_factor * max(||W_i||, epsilon) / ||G_i||)
    ```

    Args:
        grad: The gradient tensor `G` (dense).
        param: The matching weight tensor `W`.
        clip_factor: Positive scalar, the paper's lambda. Defaults to 0.01.
        epsilon: Positive scalar, the smallest weight norm. Defaults to 1e-3.
        axis: Axes to reduce over, see `unitwise_norm`. Defaults to `None`.
        grad_square: Optional float32 tensor, each unit's sum of squares of
            `grad` (reduced axes kept), if already known.

    Returns:
        A tuple `(scale, clipped_square)`: the float32 factors, which
        broadcast against `grad` (a unit is clipped exactly where its factor
        is below 1), and the float32 sum of squares of `grad * scale`, taken
        from the factors (no pass over the clipped gradient).

    Example:

    >>> scale, sq = adaptive_clip_scale(np.array([[3.0], [4.0]]), np.array([[6.0], [8.0]]), 0.25)
    >>> np.asarray(scale).tolist(), float(sq)
    ([[0.5]], 6.25)
    """
    factor, clipped_squares = adaptive_clip_units(
        grad, param, clip_factor, epsilon, axis, grad_square
    )
    return factor, ops.sum(clipped_squares)


def adaptive_clip_units(grad, param, clip_factor, epsilon, axis, grad_square=None):
    """`adaptive_clip_scale` before its last sum: the factors, and each
    unit's float32 sum of squares after clipping (both with the reduced axes
    kept), so that a caller with many tensors sums them all at once."""
    if grad_square is None:
        grad_square = _unitwise_sq_norm(grad, axis)
    return _agc_factors(
        grad_square, _unitwise_sq_norm(param, axis),
        ops.square(ops.cast(clip_factor, "float32")), epsilon * epsilon,
    )


def _agc_factors(grad_square, param_square, clip_square, epsilon_square):
    """AGC's factors from the units' sums of squares, and each unit's sum of
    squares after clipping (see `adaptive_clip_units`).

    In squares, with one square root a unit (of the ratio), not one for each
    norm: on TensorFlow each `Sqrt` of a step compiled by XLA adds about 5 ms
    to its first call. (An `epsilon` under about 1e-19 then counts as 0:
    its square is below float32's range.)
    """
    max_square = clip_square * ops.maximum(param_square, epsilon_square)
    over = grad_square > max_square
    ratio = max_square / ops.where(over, grad_square, ops.ones_like(grad_square))
    factor = ops.where(over, ops.sqrt(ratio), ops.ones_like(ratio))
    # From the factor, not the norms: flags computed from the norms were a
    # kernel of their own that each tensor's update waited for.
    return factor, ops.where(factor < 1, max_square, grad_square)


def adaptive_clip_factors(grads, params, clip_factor, epsilon, axis=None,
                          grad_squares=None):
    """`adaptive_clip_units` for a list of dense gradients and their weights.

    Tensors that are one unit each (scalars and vectors, with `axis=None`)
    take their factors together, from each tensor's sum of squares: a few
    operations for all of them. Without XLA, where each operation is a
    kernel of its own, the other gradients of one static shape and dtype
    (and their weights, of that shape) are stacked and take each operation
    once for all: on 40 Dense(64) layers, about 20 operations a tensor
    fewer. Under XLA each of them takes its own: a stacked factor would
    reach each update as a slice (see `entries`).

    Args:
        grads: List of dense gradient tensors.
        params: List of the matching weight tensors.
        clip_factor, epsilon, axis: As for `adaptive_clip_scale`.
        grad_squares: Optional float32 vector, each gradient's sum of
            squares (read for the tensors that are one unit).

    Returns:
        A tuple `(factors, clipped, clipped_square)`: the list of float32
        factors, each broadcasting against its gradient; whether any unit
        was clipped (a bool scalar); and the float32 sum of squares of all
        the clipped gradients.
    """
    if not grads:
        return [], ops.array(False), ops.zeros((), "float32")
    clip_square = ops.square(ops.cast(clip_factor, "float32"))
    epsilon_square = epsilon * epsilon
    factors = [None] * len(grads)
    flat_factors, flat_squares = [], []
    whole = [i for i, g in enumerate(grads) if axis is None and len(g.shape) <= 1]
    if whole:
        if grad_squares is None:
            grad_square = tensor_sums([grads[i] for i in whole])[:, 0]
        elif len(whole) == len(grads):
            grad_square = grad_squares
        else:
            grad_square = ops.take(grad_squares, whole)
        factor, squares = _agc_factors(
            grad_square, tensor_sums([params[i] for i in whole])[:, 0],
            clip_square, epsilon_square,
        )
        for i, f in zip(whole, entries(factor)):
            factors[i] = f
        flat_factors.append(factor)
        flat_squares.append(squares)
    rest = [i for i in range(len(grads)) if factors[i] is None]
    stack = len(rest) > 1 and not backend.compiled_by_xla(grads[0])
    groups = (
        [[rest[j] for j in group]
         for group in _shape_groups([grads[i] for i in rest], [params[i] for i in rest])]
        if stack else [[i] for i in rest]
    )
    for group in groups:
        if len(group) == 1:
            (i,) = group
            grad_square = _unitwise_sq_norm(grads[i], axis)
            param_square = _unitwise_sq_norm(params[i], axis)
        else:
            axes = _stacked_axes(len(grads[group[0]].shape), axis)
            grad_square = _sq_norm(ops.stack([grads[i] for i in group]), axes, True)
            param_square = _sq_norm(ops.stack([params[i] for i in group]), axes, True)
        factor, squares = _agc_factors(
            grad_square, param_square, clip_square, epsilon_square
        )
        if len(group) == 1:
            factors[group[0]] = factor
        else:
            for i, f in zip(group, ops.unstack(factor)):
                factors[i] = f
        flat_factors.append(ops.reshape(factor, (-1,)))
        flat_squares.append(ops.reshape(squares, (-1,)))
    clipped = ops.any(ops.concatenate(flat_factors) < 1)
    return factors, clipped, ops.sum(ops.concatenate(flat_squares))


def _shape_groups(grads, params):
    """Indices of `grads` in groups of one static shape and dtype whose
    weights have that shape (not a sparse gradient's rows) and one dtype too,
    in order of first appearance; every other alone."""
    def key(g, p):
        shape = tuple(g.shape)
        if None in shape or not shape or tuple(p.shape) != shape:
            return None
        dtype = keras.backend.standardize_dtype
        return shape, dtype(g.dtype), dtype(p.dtype)

    return _groups([key(g, p) for g, p in zip(grads, params)])


def _stacked_axes(ndim, axis):
    """The unit axes of a tensor of rank `ndim`, in a stack of such tensors
    (a new first axis; negative axes count from the end and stay)."""
    axes = _unit_axes(ndim, axis)
    if axes is None:
        axes = tuple(range(ndim))
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return tuple(a + 1 if a >= 0 else a for a in axes)


def adaptive_grad_clip(grads, params, clip_factor=0.01, epsilon=1e-3, axis=None):
    """Adaptive gradient clipping (AGC), unit-wise.

    For each unit `i` (see `unitwise_norm`) of gradient `G` and weight `W`:

    ```
    max_i = clip_factor * max(||W_i||, epsilon)
    G_i <- G_i * min(1, max_i / ||G_i||)
    ```

    Args:
        grads: List of gradient tensors; `None` entries pass through.
        params: List of the matching weight tensors.
        clip_factor: Positive scalar, the paper's lambda. Defaults to 0.01.
        epsilon: Positive scalar, the smallest weight norm. Defaults to 1e-3.
        axis: Axes to reduce over, see `unitwise_norm`. Defaults to `None`.

    Returns:
        The list of clipped tensors.

    Example:

    >>> g = [np.array([[3.0], [4.0]])]
    >>> w = [np.array([[30.0], [40.0]])]
    >>> [np.asarray(x).tolist() for x in adaptive_grad_clip(g, w, 0.05)]
    [[[1.5], [2.0]]]
    """
    values, indices, rewrap = _split(grads)
    out = []
    for g, p, rows in zip(values, params, indices):
        if g is None:
            out.append(None)
            continue
        if rows is not None and not _units_span_rows(len(g.shape), axis):
            p = ops.take(p, rows, axis=0)  # each unit lies within one row
        factor, _ = adaptive_clip_scale(g, p, clip_factor, epsilon, axis)
        out.append(g * ops.cast(factor, g.dtype))
    return rewrap(out)
