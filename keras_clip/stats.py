"""In-step gradient statistics, kept in optimizer variables.

The optimizer records them inside the compiled step; `read` turns them into
Python numbers for `opt.gradient_stats()` and the callbacks. Nothing here
recomputes gradients.
"""

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


def record(variables, *, norm, clipped_norm, threshold, clipped, finite,
           variable_norms):
    """Records one update step (scalar tensors, and the per-variable norms)."""
    v = variables
    v["grad_norm"].assign(norm)
    v["clipped_grad_norm"].assign(clipped_norm)
    v["clip_threshold"].assign(threshold)
    v["steps"].assign_add(1)
    v["clipped_steps"].assign_add(ops.cast(clipped, "int32"))
    v["nonfinite_steps"].assign_add(ops.cast(ops.logical_not(finite), "int32"))
    v["window_steps"].assign_add(ops.cast(finite, "int32"))
    v["window_norm_sum"].assign_add(ops.where(finite, norm, 0.0))
    v["window_norm_max"].assign(
        ops.where(finite, ops.maximum(v["window_norm_max"].value, norm),
                  v["window_norm_max"].value)
    )
    v["variable_norms"].assign(variable_norms)


def reset_window(variables):
    """Starts a new window (host call, outside steps)."""
    for name in WINDOW:
        variables[name].assign(ops.zeros((), FIELDS[name]))


def read(variables):
    """The statistics as a dict of Python numbers (host read, outside steps).

    The per-variable norms are left out (see `read_variable_norms`).
    """
    out = {}
    for name, dtype in FIELDS.items():
        value = ops.convert_to_numpy(variables[name].value)
        out[name] = int(value) if dtype.startswith("int") else float(value)
    steps = out["steps"]
    out["clip_rate"] = out["clipped_steps"] / steps if steps else 0.0
    out["clip_scale"] = (
        out["clipped_grad_norm"] / out["grad_norm"] if out["grad_norm"] > 0 else 1.0
    )
    return out


def read_variable_norms(variables):
    """The last step's per-variable gradient norms, as a NumPy array."""
    return ops.convert_to_numpy(variables["variable_norms"].value)
