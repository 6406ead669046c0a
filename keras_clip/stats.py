"""In-step gradient statistics, kept in optimizer variables.

The optimizer records them inside the compiled step; `summary` turns them into
Python numbers for `opt.gradient_stats()` and the callbacks. Nothing here
recomputes gradients.
"""

import math

import keras
import numpy as np
from keras import ops

# name -> dtype, in creation order (part of the saved state layout).
FIELDS = {
    "grad_norm": "float32",  # global norm before clipping, last step
    "clipped_grad_norm": "float32",  # global norm of the applied gradient
    "clip_threshold": "float32",  # threshold used on the last step
    "steps": "int32",  # update steps seen
    "clipped_steps": "int32",  # steps where clipping changed the gradient
    "nonfinite_steps": "int32",  # steps whose gradient held a NaN or an Inf
    # The window: finite steps since the last `reset_window` (a reader such as
    # `GradientMonitor` reads and resets it, so no step is missed even with
    # `steps_per_execution > 1`).
    "window_steps": "int32",
    "window_norm_sum": "float32",
    "window_norm_max": "float32",
}
WINDOW = ("window_steps", "window_norm_sum", "window_norm_max")

# The readout, on request (`ClippingMixin._keep_readout`): one int32 vector
# the step writes at each update, so that a reader that comes after every
# batch (`GradientMonitor`) reads the host once and assigns nothing. It holds
# the counters of `READOUT`, then the global norms of the last `RING` updates
# (the newest last), then the last clipped norm and threshold; the float32
# values as their bits (exact). A reading, not state: the optimizer does not
# save it.
READOUT = ("steps", "clipped_steps", "nonfinite_steps")
RING = 32


def build(optimizer, num_variables):
    """Creates the statistics variables on `optimizer`; returns them by name.

    Besides the scalars of `FIELDS`, `"variable_norms"` holds the norm of each
    trainable variable's gradient on the last step (before clipping).
    """
    out = {
        name: optimizer.add_variable((), dtype=dtype, name=f"stats_{name}")
        for name, dtype in FIELDS.items()
    }
    out["variable_norms"] = optimizer.add_variable(
        (num_variables,), dtype="float32", name="stats_variable_norms"
    )
    return out


def updates(variables, *, norm, clipped_norm, threshold, clipped, finite,
            variable_norms):
    """The new value of every statistics variable after one update step.

    Pure (reads the variables, assigns nothing), so the caller can assign in
    whichever context it must (under `tf.distribute`: cross-replica).
    """
    v = {name: var.value for name, var in variables.items()}
    return {
        "grad_norm": norm,
        "clipped_grad_norm": clipped_norm,
        "clip_threshold": threshold,
        "steps": v["steps"] + 1,
        "clipped_steps": v["clipped_steps"] + ops.cast(clipped, "int32"),
        "nonfinite_steps": v["nonfinite_steps"]
        + ops.cast(ops.logical_not(finite), "int32"),
        "window_steps": v["window_steps"] + ops.cast(finite, "int32"),
        "window_norm_sum": v["window_norm_sum"] + ops.where(finite, norm, 0.0),
        "window_norm_max": ops.where(
            finite, ops.maximum(v["window_norm_max"], norm), v["window_norm_max"]
        ),
        "variable_norms": variable_norms,
    }


def readout_variable(add_variable):
    """Creates the readout with `add_variable(shape, initializer, dtype, name)`."""
    return add_variable(
        shape=(len(READOUT) + RING + 2,), initializer="zeros", dtype="int32",
        name="stats_readout",
    )


def readout(new, old, bitcast):
    """The readout after an update (pure), from the statistics' new values
    (`updates`), the readout's old value and the backend's `bitcast(x,
    dtype)`: the ring moves one place, and the update's norm comes last."""
    counters = ops.stack([new[name] for name in READOUT])
    floats = ops.stack([
        ops.cast(new[name], "float32")
        for name in ("grad_norm", "clipped_grad_norm", "clip_threshold")
    ])
    ring = old[len(READOUT) + 1 : len(READOUT) + RING]
    return ops.concatenate([counters, ring, bitcast(floats, "int32")])


def since(readout, last):
    """The statistics of `summary` from a readout, their window the updates
    after those of `last`.

    Args:
        readout: The readout's value, a NumPy int32 vector.
        last: An earlier reading of the same optimizer (with `steps` and
            `iterations`): each update adds one to both.

    Returns:
        `(stats, complete)`: the dict `gradient_stats` returns; `complete`
        is False when more than `RING` updates came after `last`, and the
        window then holds the last `RING` of them. None when the readout is
        older than `last` (no update has written it since the statistics
        were set otherwise, as by loading them).
    """
    readout = np.asarray(readout, "int32")
    counters = dict(zip(READOUT, readout[: len(READOUT)].tolist()))
    *ring, clipped_norm, threshold = readout[len(READOUT):].view("float32").tolist()
    new = counters["steps"] - last["steps"]
    if new < 0:
        return None
    finite = [x for x in ring[RING - min(new, RING) :] if math.isfinite(x)]
    out = summary({
        **counters,
        "grad_norm": ring[-1],
        "clipped_grad_norm": clipped_norm,
        "clip_threshold": threshold,
        "window_steps": len(finite),
        "window_norm_sum": sum(finite),
        "window_norm_max": max(finite, default=0.0),
    })
    out["iterations"] = last["iterations"] + new
    return out, new <= RING


def summary(values):
    """The statistics as a dict of Python numbers, from the raw values of the
    `FIELDS` variables (read from the host, outside steps).

    The per-variable norms are left out (see `read_variable_norms`).
    """
    out = {
        name: int(values[name]) if dtype.startswith("int") else float(values[name])
        for name, dtype in FIELDS.items()
    }
    steps = out["steps"]
    out["clip_rate"] = out["clipped_steps"] / steps if steps else 0.0
    out["clip_scale"] = (
        out["clipped_grad_norm"] / out["grad_norm"] if out["grad_norm"] > 0 else 1.0
    )
    return out


def read_variable_norms(variables):
    """The last step's per-variable gradient norms, as a NumPy array."""
    return ops.convert_to_numpy(variables["variable_norms"].value)


# Histograms of log10|g|, counted in the step on request (see
# `ClippingMixin.record_gradient_histograms`).


class GradientHistograms:
    """A request for bucket counts of `log10|g|`, per group of variables.

    A reader (`GradientHistogramLogger`) creates one and hands it to the
    optimizer's `record_gradient_histograms`; from then on the step counts
    the gradients (before clipping) of every `freq`-th update, the first
    included, into `counts` (one row of `len(edges) + 3` buckets per group,
    see `bucket_counts`) and writes that update's index into `step`. The
    optimizer creates both variables (`build`) among its own, so that every
    backend's step carries them (JAX's stateless step returns only the
    optimizer's variables); they are a reading, not training state, and the
    optimizer does not save them.

    Args:
        edges: 1-D float32 NumPy array of strictly increasing edges.
        freq: Positive int: count every `freq` updates.
        groups: Dict of variable path -> group index (0 .. n - 1); a
            variable not in it is not counted.
    """

    def __init__(self, edges, freq, groups):
        self.edges = np.asarray(edges, "float32")
        self.freq = int(freq)
        self.groups = dict(groups)
        self.counts = None
        self.step = None

    def build(self, add_variable):
        """Creates `counts` and `step` with `add_variable(shape, initializer,
        dtype, name)` (the optimizer's `add_variable`)."""
        rows = max(self.groups.values(), default=-1) + 1
        self.counts = add_variable(
            shape=(max(rows, 1), len(self.edges) + 3),
            initializer="zeros",
            dtype="int32",
            name="gradient_histogram_counts",
        )
        self.step = add_variable(
            shape=(), initializer=keras.initializers.Constant(-1), dtype="int32",
            name="gradient_histogram_step",
        )

    def due(self, step):
        """Whether update `step` is counted (a bool tensor)."""
        return ops.equal(step % self.freq, 0)

    def updates(self, grads, variables, step, bincount):
        """The new counts and step for update `step` (pure).

        Args:
            grads: The step's gradients before clipping (dense values; a
                sparse gradient's rows), in the order of `variables`.
            variables: The variables they belong to.
            step: The update's index.
            bincount: `bincount(index, length)`, a fixed-length count that
                compiles with XLA (the backend's).

        Returns:
            A list of `(variable, new value)` pairs.
        """
        length = len(self.edges) + 3
        rows = [None] * self.counts.shape[0]
        for g, v in zip(grads, variables):
            i = self.groups.get(_variable_path(v))
            if i is None:
                continue
            c = bucket_counts(g, self.edges, bincount)
            missing = _missing_entries(g, v)
            if missing is not None:  # sparse: the absent rows are zeros
                c = c + ops.cast(missing, "int32") * ops.one_hot(0, length, dtype="int32")
            rows[i] = c if rows[i] is None else rows[i] + c
        zeros = ops.zeros((length,), "int32")
        return [
            (self.counts, ops.stack([zeros if r is None else r for r in rows])),
            (self.step, ops.cast(step, "int32")),
        ]

    def read(self):
        """`(step, counts)` of the last counted update, as Python int and
        NumPy array (host read; `step` is -1 before the first)."""
        step = int(ops.convert_to_numpy(self.step.value))
        return step, ops.convert_to_numpy(self.counts.value)


def bucket_counts(grad, edges, bincount):
    """Counts the entries of `grad` in the buckets of `log10|grad|`.

    With `E = len(edges)`, the `E + 3` buckets are, in order:

    ```
    0          zeros          g == 0
    1          underflow      0 < |g|,  log10|g| < edges[0]
    1 + i      bin i          edges[i - 1] <= log10|g| < edges[i]  (i = 1..E-1)
    E + 1      overflow       edges[-1] <= log10|g|,  g finite
    E + 2      non-finite     NaN, +inf, -inf
    ```

    In float32 and XLA-compatible. Evenly spaced edges use the bin formula
    `floor((log10|g| - edges[0]) / width)` (like `tf.histogram_fixed_width`);
    other edges a binary search. Either way an entry within float32 rounding
    of an edge may land on either side of it.

    Args:
        grad: A tensor of any shape and float dtype.
        edges: 1-D float32 NumPy array of strictly increasing edges.
        bincount: `bincount(index, length)` (see `GradientHistograms.updates`).

    Returns:
        An int32 tensor of shape `(len(edges) + 3,)` that sums to the size of
        `grad`.
    """
    n_edges = len(edges)
    length = n_edges + 3
    a = ops.abs(ops.reshape(ops.cast(grad, "float32"), (-1,)))
    finite = ops.isfinite(a)
    positive = ops.logical_and(finite, a > 0)
    x = ops.log10(ops.where(positive, a, ops.ones((), a.dtype)))
    if _is_uniform(edges):
        low = float(edges[0])
        width = (float(edges[-1]) - low) / (n_edges - 1)
        b = ops.floor((x - low) / width) + 1.0
        b = ops.cast(ops.clip(b, 0.0, float(n_edges)), "int32")
    else:
        b = ops.cast(ops.searchsorted(ops.array(edges), x, side="right"), "int32")
    index = ops.where(positive, b + 1, ops.where(finite, 0, n_edges + 2))
    return ops.reshape(ops.cast(bincount(index, length), "int32"), (length,))


def _is_uniform(edges):
    diffs = np.diff(np.asarray(edges).astype("float64"))
    return bool(np.allclose(diffs, diffs[0], rtol=1e-5, atol=0.0))


def _variable_path(variable):
    return getattr(variable, "path", None) or variable.name


def _missing_entries(grad, variable):
    """How many entries of `variable` a (sparse) gradient leaves out, or None."""
    size = int(np.prod(variable.shape))
    shape = tuple(grad.shape)
    if None not in shape and int(np.prod(shape)) == size:
        return None
    return size - ops.size(grad)
