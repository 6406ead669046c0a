"""Adaptive clippers: the threshold comes from the run's own gradient history.

Their state lives in optimizer variables (saved with the model), they compile
with XLA (no host round trip, no Python branch on values), and a non-finite
norm never enters their history or statistics.
"""

import numpy as np
from keras import ops

from keras_clip import _checks
from keras_clip import ops as kc_ops
from keras_clip.clippers.base import Clipper
from keras_clip.clippers.base import Threshold
from keras_clip.clippers.base import clip_to
from keras_clip.clippers.base import global_norm
from keras_clip.clippers.fixed import _register


@_register
class AutoClip(Clipper):
    """AutoClip: clip to a percentile of the run's own gradient-norm history.

    Each step the global norm `g` joins the history (the last `history_size`
    finite norms), then

    ```
    threshold = percentile(history, percentile)   # linear interpolation
    grads <- grads * min(1, threshold / g)
    ```

    so the first step never clips. The history is also kept in order (state
    `sorted`, padded with `+inf`): each step removes the norm that leaves and
    inserts the new one in O(history_size), instead of sorting the whole
    history between the norm and the first update.

    Args:
        percentile: Float in (0, 100], the percentile of the history used as
            the threshold. Defaults to 10.0.
        history_size: Int >= 1, how many recent norms are kept. Defaults to
            1000.

    Example:

    >>> opt = ClippedAdam(clipper=AutoClip(percentile=10.0))

    Reference:
        [Seetharaman et al., 2020](https://arxiv.org/abs/2007.14469)
    """

    def __init__(self, percentile=10.0, history_size=1000):
        self.percentile = _checks.number("percentile", percentile, low=0, high=100)
        self.history_size = _checks.number(
            "history_size", history_size, low=1, low_open=False, integer=True
        )

    def init_state(self, variables):
        return {
            "history": np.zeros(self.history_size, "float32"),
            "sorted": np.full(self.history_size, np.inf, "float32"),
            "count": np.asarray(0, "int32"),
            "threshold": np.asarray(0.0, "float32"),
        }

    def update(self, grads, state, params=None, *, step=None, sums=None):
        norm = global_norm(self._sums(grads, state, step, sums))
        finite = ops.isfinite(norm)
        size = self.history_size
        count, ordered = state["count"], state["sorted"]
        at = ops.mod(count, size)
        index = ops.arange(size, dtype="int32")
        # The norm that leaves: the oldest, or a +inf pad while filling up.
        old = ops.where(count >= size, ops.take(state["history"], at), np.inf)
        history = ops.where(ops.logical_and(finite, index == at), norm, state["history"])
        ordered = ops.where(finite, _replace_sorted(ordered, old, norm), ordered)
        count = count + ops.cast(finite, "int32")
        # Percentile of the n valid entries, linear interpolation (NumPy's).
        n = ops.maximum(ops.minimum(count, size), 1)
        rank = (self.percentile / 100.0) * ops.cast(n - 1, "float32")
        lo = ops.cast(ops.floor(rank), "int32")
        hi = ops.minimum(lo + 1, n - 1)
        a, b = ops.take(ordered, lo), ops.take(ordered, hi)
        threshold = a + (rank - ops.cast(lo, "float32")) * (b - a)
        threshold = ops.where(count > 0, threshold, state["threshold"])
        clipped, info = clip_to(grads, norm, threshold)
        new_state = {
            "history": history, "sorted": ordered, "count": count,
            "threshold": threshold,
        }
        return clipped, new_state, info

    def get_config(self):
        return {"percentile": self.percentile, "history_size": self.history_size}


def _replace_sorted(ordered, old, new):
    """`ordered` (ascending) with one `old` removed and `new` inserted in place.

    O(n) compares and two gathers, no sort: `old` must be in `ordered`.
    """
    size = ordered.shape[0]
    index = ops.arange(size, dtype="int32")
    gone = ops.sum(ops.cast(ordered < old, "int32"))  # where `old` is
    place = ops.sum(ops.cast(ordered < new, "int32")) - ops.cast(old < new, "int32")

    def without_old(i):  # `ordered` with `old` removed, at positions `i`
        # (The last position has no such entry; it is never selected.)
        return ops.take(ordered, ops.minimum(i + ops.cast(i >= gone, "int32"), size - 1))

    before = without_old(index)
    after = without_old(ops.maximum(index - 1, 0))
    return ops.where(index < place, before, ops.where(index == place, new, after))


@_register
class ZClip(Clipper):
    """ZClip: z-score spike detection on an EMA of the global gradient norm.

    Warm-up: the first `warmup_steps` global norms are collected (clipped only
    by `max_norm`, if set); then `mean` and `var` are their mean and population
    variance. Afterwards, with `g` the global norm and `std = sqrt(var)`:

    ```
    mode="zscore":      z = (g - mean) / (std + epsilon); spike if z > z_thresh
        clip_option="adaptive_scaling":
                        a = clip_factor * (mean + z_thresh * std / (z / z_thresh))
        clip_option="mean":
                        a = mean
    mode="percentile":  a = mean + z_thresh * std; spike if g > a
    threshold = min(a if spike else g, max_norm)
    grads <- grads * min(1, threshold / g)
    x = a if spike else g                  # no update on a spike if
    mean <- alpha * mean + (1 - alpha) * x   # skip_update_on_spike
    var  <- alpha * var + (1 - alpha) * (x - mean) ** 2
    ```

    Unlike the reference code, a non-finite `g` never enters the warm-up
    buffer or the statistics.

    Args:
        alpha: Float in (0, 1), the EMA decay. Defaults to 0.97.
        z_thresh: Positive float, the z-score above which a norm is a spike.
            Defaults to 2.5.
        warmup_steps: Int >= 1. Defaults to 25.
        max_norm: Optional positive float, an absolute cap on the threshold;
            it may be changed mid-training (`clipper.max_norm = 2.0`, or
            `None`), without re-tracing. Defaults to `None`.
        mode: `"zscore"` or `"percentile"`. Defaults to `"zscore"`.
        clip_option: `"adaptive_scaling"` or `"mean"` (zscore mode).
            Defaults to `"adaptive_scaling"`.
        clip_factor: Positive float multiplying the adaptive threshold.
            Defaults to 1.0.
        skip_update_on_spike: Bool: leave the statistics alone on a spike.
            Defaults to `False`.
        epsilon: Positive float added to the std. Defaults to 1e-6.

    Example:

    >>> opt = ClippedAdamW(clipper=ZClip(alpha=0.97, z_thresh=2.5))

    Reference:
        [Kumar et al., 2025](https://arxiv.org/abs/2504.02507)
    """

    max_norm = Threshold("max_norm", optional=True, schedule=False)

    def __init__(
        self,
        alpha=0.97,
        z_thresh=2.5,
        warmup_steps=25,
        max_norm=None,
        mode="zscore",
        clip_option="adaptive_scaling",
        clip_factor=1.0,
        skip_update_on_spike=False,
        epsilon=1e-6,
    ):
        self.alpha = _checks.number("alpha", alpha, low=0, high=1, high_open=True)
        self.z_thresh = _checks.number("z_thresh", z_thresh, low=0)
        self.warmup_steps = _checks.number(
            "warmup_steps", warmup_steps, low=1, low_open=False, integer=True
        )
        self.max_norm = max_norm
        self.mode = _checks.choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = _checks.choice(
            "clip_option", clip_option, ("adaptive_scaling", "mean")
        )
        self.clip_factor = _checks.number("clip_factor", clip_factor, low=0)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(
                "`skip_update_on_spike` must be a bool. "
                f"Received: skip_update_on_spike={skip_update_on_spike!r}"
            )
        self.skip_update_on_spike = skip_update_on_spike
        self.epsilon = _checks.number("epsilon", epsilon, low=0)

    def init_state(self, variables):
        return {
            "buffer": np.zeros(self.warmup_steps, "float32"),
            "count": np.asarray(0, "int32"),
            "mean": np.asarray(0.0, "float32"),
            "var": np.asarray(0.0, "float32"),
            "threshold": np.asarray(0.0, "float32"),
            "max_norm": Threshold.initial(self.max_norm),
        }

    def update(self, grads, state, params=None, *, step=None, sums=None):
        g = global_norm(self._sums(grads, state, step, sums))
        finite = ops.isfinite(g)
        count, mean, var = state["count"], state["mean"], state["var"]
        warm = count < self.warmup_steps  # this step is a warm-up step

        # Warm-up: collect; on the last warm-up step, initialise mean and var.
        slot = ops.arange(self.warmup_steps, dtype="int32") == count
        buffer = ops.where(ops.logical_and(finite, slot), g, state["buffer"])
        w_mean = ops.mean(buffer)
        w_var = ops.mean(ops.square(buffer - w_mean))

        # After warm-up: spike detection and adaptive threshold.
        std = ops.sqrt(var)
        if self.mode == "zscore":
            z = (g - mean) / (std + self.epsilon)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                safe_z = ops.where(spike, z, ops.ones_like(z))
                adaptive = self.clip_factor * (
                    mean + self.z_thresh * std / (safe_z / self.z_thresh)
                )
            else:
                adaptive = mean
        else:
            adaptive = mean + self.z_thresh * std
            spike = g > adaptive
        spike = ops.logical_and(spike, ops.logical_and(finite, ops.logical_not(warm)))
        threshold = ops.minimum(ops.where(spike, adaptive, g), state["max_norm"])

        x = ops.where(spike, adaptive, g)
        ema_mean = self.alpha * mean + (1 - self.alpha) * x
        ema_var = self.alpha * var + (1 - self.alpha) * ops.square(x - ema_mean)
        update_ema = ops.logical_and(finite, ops.logical_not(warm))
        if self.skip_update_on_spike:
            update_ema = ops.logical_and(update_ema, ops.logical_not(spike))
        last_warm = ops.logical_and(
            ops.logical_and(warm, finite), count + 1 == self.warmup_steps
        )
        new_mean = ops.where(last_warm, w_mean, ops.where(update_ema, ema_mean, mean))
        new_var = ops.where(last_warm, w_var, ops.where(update_ema, ema_var, var))

        clipped, info = clip_to(grads, g, threshold)
        new_state = {
            "buffer": buffer,
            "count": count + ops.cast(finite, "int32"),
            "mean": new_mean,
            "var": new_var,
            "threshold": ops.where(finite, threshold, state["threshold"]),
            "max_norm": state["max_norm"],
        }
        return clipped, new_state, info

    def get_config(self):
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
            "mode": self.mode,
            "clip_option": self.clip_option,
            "clip_factor": self.clip_factor,
            "skip_update_on_spike": self.skip_update_on_spike,
            "epsilon": self.epsilon,
        }


@_register
class AdaGC(Clipper):
    """AdaGC: per-tensor thresholds from an EMA of each tensor's clipped norm.

    For each gradient tensor `i`, with `gamma_i` its state:

    ```
    warm-up (first warmup_steps finite steps), global clipping:
        g_i <- g_i * min(1, max_norm / ||g||)
        gamma_i <- min(gamma_i, ||g_i||)            # gamma starts at +inf
    afterwards, per tensor:
        g_i <- g_i * min(1, relative_factor * gamma_i / ||g_i||)
        gamma_i <- beta * gamma_i + (1 - beta) * ||g_i||
    ```

    (norms after clipping on the right-hand sides). Choices the paper leaves
    open: a tensor whose gradient norm is exactly 0 leaves its `gamma_i`
    alone (an unused layer is not frozen forever), and `clip_threshold` in the
    statistics is the global norm the per-tensor thresholds allow,
    `sqrt(sum_i (relative_factor * gamma_i) ** 2)` (`max_norm` in warm-up).

    Args:
        relative_factor: Float >= 1, the paper's lambda_rel (below 1 the
            thresholds would shrink step after step). Defaults to 1.05.
        beta: Float in (0, 1), the EMA decay. Defaults to 0.98.
        max_norm: Positive float, the absolute global bound during warm-up
            (lambda_abs); it may be changed mid-training, without
            re-tracing. Defaults to 1.0.
        warmup_steps: Int >= 1. Defaults to 100.

    Example:

    >>> opt = ClippedAdamW(clipper=AdaGC())

    Reference:
        [Wang et al., 2025](https://arxiv.org/abs/2502.11034)
    """

    max_norm = Threshold("max_norm", schedule=False)

    def __init__(self, relative_factor=1.05, beta=0.98, max_norm=1.0, warmup_steps=100):
        self.relative_factor = _checks.number("relative_factor", relative_factor)
        if self.relative_factor < 1:
            # Each threshold is relative_factor times an EMA of clipped norms:
            # below 1 it shrinks step after step, whatever the gradients.
            raise ValueError(
                "`relative_factor` must be at least 1 (below 1 the thresholds "
                "shrink step after step; the paper uses 1.05). "
                f"Received: relative_factor={relative_factor!r}"
            )
        self.beta = _checks.number("beta", beta, low=0, high=1, high_open=True)
        self.max_norm = max_norm
        self.warmup_steps = _checks.number(
            "warmup_steps", warmup_steps, low=1, low_open=False, integer=True
        )

    def init_state(self, variables):
        return {
            "gamma": np.full(len(variables), np.inf, "float32"),
            "count": np.asarray(0, "int32"),
            "threshold": np.asarray(0.0, "float32"),
            "max_norm": Threshold.initial(self.max_norm),
        }

    def update(self, grads, state, params=None, *, step=None, sums=None):
        norms = ops.sqrt(self._sums(grads, state, step, sums)[:, 0])
        g = ops.sqrt(ops.sum(ops.square(norms)))
        finite = ops.isfinite(g)
        gamma, count, max_norm = state["gamma"], state["count"], state["max_norm"]
        warm = count < self.warmup_steps

        local = self.relative_factor * gamma
        per_tensor = ops.where(warm, max_norm * ops.ones_like(norms), local)
        # Warm-up clips globally (one factor); afterwards each tensor alone.
        scales = ops.where(
            warm,
            kc_ops.clip_scale(g, max_norm) * ops.ones_like(norms),
            kc_ops.clip_scale(norms, local),
        )
        new_norms = norms * scales
        ema = self.beta * gamma + (1 - self.beta) * new_norms
        new_gamma = ops.where(warm, ops.minimum(gamma, new_norms), ema)
        new_gamma = ops.where(ops.logical_and(finite, norms > 0), new_gamma, gamma)

        threshold = ops.where(
            warm, max_norm, ops.sqrt(ops.sum(ops.square(per_tensor)))
        )
        info = {
            "clipped": ops.any(scales < 1),
            "clipped_norm": ops.sqrt(ops.sum(ops.square(new_norms))),
        }
        new_state = {
            "gamma": new_gamma,
            "count": count + ops.cast(finite, "int32"),
            "threshold": ops.where(finite, threshold, state["threshold"]),
            "max_norm": max_norm,
        }
        return kc_ops.scale(grads, scales), new_state, info

    def get_config(self):
        return {
            "relative_factor": self.relative_factor,
            "beta": self.beta,
            "max_norm": self.max_norm,
            "warmup_steps": self.warmup_steps,
        }
