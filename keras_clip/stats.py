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
}


def build(optimizer):
    """Creates the statistics variables on `optimizer`; returns them by name."""
    return {
        name: optimizer.add_variable((), dtype=dtype, name=f"stats_{name}")
        for name, dtype in FIELDS.items()
    }


def record(variables, *, norm, clipped_norm, threshold, clipped, finite):
    """Records one update step (all arguments are scalar tensors)."""
    v = variables
    v["grad_norm"].assign(norm)
    v["clipped_grad_norm"].assign(clipped_norm)
    v["clip_threshold"].assign(threshold)
    v["steps"].assign_add(1)
    v["clipped_steps"].assign_add(ops.cast(clipped, "int32"))
    v["nonfinite_steps"].assign_add(ops.cast(ops.logical_not(finite), "int32"))


def read(variables):
    """The statistics as a dict of Python numbers (host read, outside steps)."""
    out = {}
    for name, var in variables.items():
        value = ops.convert_to_numpy(var.value)
        out[name] = int(value) if FIELDS[name].startswith("int") else float(value)
    steps = out["steps"]
    out["clip_rate"] = out["clipped_steps"] / steps if steps else 0.0
    out["clip_scale"] = (
        out["clipped_grad_norm"] / out["grad_norm"] if out["grad_norm"] > 0 else 1.0
    )
    return out
