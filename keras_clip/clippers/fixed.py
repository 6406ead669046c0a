"""Clippers with a fixed (or scheduled) threshold."""

import re

import keras
from keras import ops

from keras_clip import _checks
from keras_clip import ops as kc_ops
from keras_clip.clippers.base import Clipper
from keras_clip.clippers.base import Threshold
from keras_clip.clippers.base import clip_to
from keras_clip.clippers.base import global_norm

_register = keras.saving.register_keras_serializable(package="keras_clip")


@_register
class ValueClip(Clipper):
    """Clips every gradient element to `[-max_value, max_value]`.

    ```
    g <- clip(g, -max_value, max_value)
    ```

    Args:
        max_value: Positive float, or a
            `keras.optimizers.schedules.LearningRateSchedule` evaluated on the
            optimizer's iteration count. Defaults to 1.0.

    Example:

    >>> opt = ClippedSGD(clipper=ValueClip(0.5))
    """

    max_value = Threshold()

    def __init__(self, max_value=1.0):
        self.max_value = max_value

    separable = True

    def init_state(self, variables):
        return {"threshold": Threshold.initial(self.max_value)}

    def tensor_terms(self, state, step):
        # The clipped squares, and how far clipping moves the elements:
        # summed in the pass that takes the norms, they cost no pass of their
        # own. The second sum is positive exactly when an element moves (a
        # difference |g| - c > 0 is at least one unit in the last place of
        # c, and a sum of non-negative terms does not cancel); a count of
        # the elements (a cast of `|g| > c`) made JAX's XLA write each
        # gradient out again first (benchmarks/README.md, design table).
        c = self._current("max_value", state, step)

        def clipped_square(g):
            (clipped,) = kc_ops.clip_by_value([g], c)
            return ops.square(ops.cast(clipped, "float32"))

        def moved(g):
            return ops.maximum(ops.abs(g) - ops.cast(c, g.dtype), 0)

        return (clipped_square, moved)

    def update(self, grads, state, params=None, *, step=None, sums=None):
        c = self._current("max_value", state, step)
        sums = self._sums(grads, state, step, sums)
        info = {
            "clipped": ops.any(sums[:, 2] > 0),
            "clipped_norm": ops.sqrt(ops.sum(sums[:, 1])),
        }
        return kc_ops.clip_by_value(grads, c), {"threshold": c}, info

    def get_config(self):
        return {"max_value": self._serialize(self.max_value)}


@_register
class NormClip(Clipper):
    """Clips each gradient tensor on its own to an L2 norm of `max_norm`.

    ```
    g_i <- g_i * min(1, max_norm / ||g_i||)
    ```

    Args:
        max_norm: Positive float, or a
            `keras.optimizers.schedules.LearningRateSchedule`. Defaults to 1.0.

    Example:

    >>> opt = ClippedSGD(clipper=NormClip(1.0))  # same as clipnorm=1.0
    """

    max_norm = Threshold()

    def __init__(self, max_norm=1.0):
        self.max_norm = max_norm

    separable = True

    def init_state(self, variables):
        return {"threshold": Threshold.initial(self.max_norm)}

    def update(self, grads, state, params=None, *, step=None, sums=None):
        c = self._current("max_norm", state, step)
        norms = ops.sqrt(self._sums(grads, state, step, sums)[:, 0])
        info = {
            "clipped": ops.any(norms > c),
            "clipped_norm": ops.sqrt(ops.sum(ops.square(ops.minimum(norms, c)))),
        }
        return kc_ops.scale(grads, kc_ops.clip_scale(norms, c)), {"threshold": c}, info

    def get_config(self):
        return {"max_norm": self._serialize(self.max_norm)}


@_register
class GlobalNormClip(Clipper):
    """Scales all gradients by one factor so their global L2 norm is bounded.

    ```
    n = sqrt(sum_i ||g_i||^2)
    g_i <- g_i * min(1, max_norm / n)
    ```

    Args:
        max_norm: Positive float, or a
            `keras.optimizers.schedules.LearningRateSchedule`. Defaults to 1.0.

    Example:

    >>> opt = ClippedAdam(clipper=GlobalNormClip(1.0))  # global_clipnorm=1.0
    """

    max_norm = Threshold()

    def __init__(self, max_norm=1.0):
        self.max_norm = max_norm

    def init_state(self, variables):
        return {"threshold": Threshold.initial(self.max_norm)}

    def update(self, grads, state, params=None, *, step=None, sums=None):
        c = self._current("max_norm", state, step)
        norm = global_norm(self._sums(grads, state, step, sums))
        clipped, info = clip_to(grads, norm, c)
        return clipped, {"threshold": c}, info

    def get_config(self):
        return {"max_norm": self._serialize(self.max_norm)}


@_register
class AdaptiveGradClip(Clipper):
    """Adaptive gradient clipping, unit-wise (AGC).

    For each unit `i` of a gradient `G` and its weight `W` (a unit is a slice
    along the last axis, Keras's kernel layout; scalars and vectors are one
    unit):

    ```
    max_i = clip_factor * max(||W_i||, epsilon)
    G_i <- G_i * min(1, max_i / ||G_i||)
    ```

    Args:
        clip_factor: Positive float, the paper's lambda, or a
            `keras.optimizers.schedules.LearningRateSchedule`. Defaults to 0.01.
        epsilon: Positive float, the smallest weight norm. Defaults to 1e-3.
        axis: Optional int or tuple of ints, the axes each unit's norm is
            taken over. Defaults to `None` (all axes but the last).
        exclude: Optional regular expression or list of them; a variable whose
            path matches any (`re.search`) is left unclipped. The paper leaves
            the final classifier unclipped, e.g. `exclude=["predictions"]`.
            Defaults to `None`.

    Example:

    >>> opt = ClippedSGD(clipper=AdaptiveGradClip(0.01, exclude=["logits"]))

    Reference:
        [Brock et al., 2021](https://arxiv.org/abs/2102.06171)
    """

    clip_factor = Threshold()

    def __init__(self, clip_factor=0.01, epsilon=1e-3, axis=None, exclude=None):
        self.clip_factor = clip_factor
        self.epsilon = _checks.number("epsilon", epsilon, low=0)
        self.axis = _check_axis(axis)
        self.exclude = _check_exclude(exclude)
        self._patterns = [re.compile(p) for p in self.exclude or ()]

    separable = True

    def init_state(self, variables):
        return {"threshold": Threshold.initial(self.clip_factor)}

    def update(self, grads, state, params=None, *, step=None, sums=None):
        if params is None or len(params) != len(grads):
            raise ValueError(
                "`AdaptiveGradClip` needs the weights: pass `params`, one per "
                f"gradient. Received: params={params!r}"
            )
        c = self._current("clip_factor", state, step)
        squares = self._sums(grads, state, step, sums)[:, 0]
        excluded = [self._excluded(p) for p in params]
        kept = [i for i, out in enumerate(excluded) if not out]
        found, clipped, clipped_square = kc_ops.adaptive_clip_factors(
            [grads[i] for i in kept], [_value(params[i]) for i in kept],
            c, self.epsilon, self.axis, grad_squares=_rows(squares, kept, len(grads)),
        )
        factors = [ops.ones((), "float32")] * len(grads)
        for i, factor in zip(kept, found):
            factors[i] = factor
        left = [i for i, out in enumerate(excluded) if out]  # left as they are
        if left:
            clipped_square = clipped_square + ops.sum(_rows(squares, left, len(grads)))
        info = {"clipped": clipped, "clipped_norm": ops.sqrt(clipped_square)}
        return kc_ops.scale(grads, factors), {"threshold": c}, info

    def _excluded(self, param):
        path = getattr(param, "path", None) or getattr(param, "name", None) or ""
        return any(p.search(path) for p in self._patterns)

    def get_config(self):
        axis = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        return {
            "clip_factor": self._serialize(self.clip_factor),
            "epsilon": self.epsilon,
            "axis": axis,
            "exclude": None if self.exclude is None else list(self.exclude),
        }


def _rows(vector, rows, n):
    """The entries `rows` of a vector of `n`: the vector itself if all."""
    if len(rows) == n:
        return vector
    return ops.take(vector, rows) if rows else None


def _value(param):
    """A weight's value: a Keras variable's, or the tensor itself."""
    value = getattr(param, "value", param)
    return param if callable(value) else value  # (a tf.Variable's is a method)


def _check_axis(axis):
    if axis is None:
        return None
    if isinstance(axis, (list, tuple)):
        items = list(axis)
    else:
        items = [axis]
    for a in items:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(
                "`axis` must be None, an int or a tuple of ints. "
                f"Received: axis={axis!r}"
            )
    return tuple(items) if isinstance(axis, (list, tuple)) else axis


def _check_exclude(exclude):
    if exclude is None:
        return None
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, (list, tuple)) or not all(
        isinstance(e, str) for e in exclude
    ):
        raise TypeError(
            "`exclude` must be None, a string or a list of strings. "
            f"Received: exclude={exclude!r}"
        )
    for e in exclude:
        try:
            re.compile(e)
        except re.error as err:
            raise ValueError(
                f"`exclude` holds an invalid regular expression ({err}). "
                f"Received: exclude={exclude!r}"
            ) from None
    return list(exclude)
