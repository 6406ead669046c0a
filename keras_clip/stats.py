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
