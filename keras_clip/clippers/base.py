"""The `Clipper` base class and the threshold attribute shared by clippers."""

import numpy as np
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

from keras_clip import _checks
from keras_clip.ops import _sq_norm
from keras_clip.ops import _sums


class Threshold:
    """A clipper attribute that is a float or a schedule and lives in a variable.

    Before the clipper is built it is a plain attribute. Once an optimizer has
    built the clipper, setting a new float assigns the clipper's `threshold`
    variable, so the next step uses it without re-tracing.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj.__dict__[self.name]

    def __set__(self, obj, value):
        value = _checks.threshold(self.name, value)
        variable = obj._variables.get("threshold") if obj._variables else None
        if variable is not None:
            old = obj.__dict__[self.name]
            if isinstance(value, LearningRateSchedule) or isinstance(
                old, LearningRateSchedule
            ):
                raise ValueError(
                    f"`{self.name}` cannot change between a number and a "
                    "schedule once the optimizer is built. "
                    f"Received: {self.name}={value!r}"
                )
            variable.assign(value)
        obj.__dict__[self.name] = value


class Clipper:
    """Base class of keras-clip's clippers.

    A clipper is a pure rule plus a state layout. The optimizer creates one
    variable per entry of `init_state(variables)` in `build()` and, every step,
    calls

    ```
    grads, new_state, info = clipper.update(grads, state, params, norm=, step=)
    ```

    with `state` the current values of those variables. `new_state` has the
    same keys; its `"threshold"` entry is the threshold used on this step.
    `info` holds two scalars the optimizer records as statistics: `"clipped"`
    (bool: did clipping change anything) and `"clipped_norm"` (float32: the
    global norm after clipping), both computed without another pass over the
    gradients.

    Subclasses implement `init_state`, `update` and `get_config`. A rule that
    clips each tensor on its own, given the step's threshold (its only state,
    `{"threshold": ...}`), sets `per_tensor = True` and implements
    `step_threshold` and `clip_tensor` instead of `update`: the optimizer then
    clips each tensor right before its own update, while the tensor is in
    cache. Sums over each gradient that such a rule needs (e.g. for its
    statistics) are declared by `tensor_terms`: the optimizer takes them in
    the pass that takes the norms, which reads every gradient anyway.
    """

    _variables = None
    per_tensor = False

    def init_state(self, variables):
        """Initial state: a dict of name -> NumPy array (shape, dtype, value).

        Args:
            variables: The model variables the optimizer is built with.
        """
        raise NotImplementedError

    def update(self, grads, state, params=None, *, norm=None, step=None,
               squares=None):
        """Clips `grads`.

        Args:
            grads: List of gradient tensors (no `None`).
            state: Dict of the current state tensors, as from `init_state`.
            params: List of the matching weights (variables or tensors);
                only clippers that need weights read them.
            norm: Optional float32 global norm of `grads`, if already known.
            squares: Optional float32 vector of each gradient's sum of
                squares, if already known (saves per-tensor rules a pass).
            step: The optimizer's iteration count, for schedules.

        Returns:
            A tuple `(clipped_grads, new_state, info)`.
        """
        if not self.per_tensor:
            raise NotImplementedError
        threshold = self.step_threshold(state, step)
        if params is None:
            params = [None] * len(grads)
        terms = self.tensor_terms(threshold)
        clipped, squares_after, flags = [], [], []
        for i, (g, p) in enumerate(zip(grads, params)):
            square = _sq_norm(g) if squares is None else squares[i]
            sums = tuple(_sums(g, terms)) if terms else ()
            path = getattr(p, "path", None) or getattr(p, "name", None)
            value = getattr(p, "value", p)  # a weight with a value, or a tensor
            value = p if callable(value) else value  # (a tf.Variable's is a method)
            out, square_after, flag = self.clip_tensor(
                g, value, threshold, square=square, sums=sums, path=path
            )
            clipped.append(out)
            squares_after.append(square_after)
            flags.append(flag)
        return clipped, {"threshold": threshold}, per_tensor_info(squares_after, flags)

    def step_threshold(self, state, step):
        """This step's threshold, for `per_tensor` rules (float32 scalar)."""
        raise NotImplementedError

    def tensor_terms(self, threshold):
        """Elementwise functions of a gradient whose sums `clip_tensor` needs.

        For `per_tensor` rules: each function maps a gradient (in its own
        dtype) to a tensor of its shape, whose values are summed in float32.
        Defaults to none.
        """
        return ()

    def clip_tensor(self, grad, param, threshold, *, square, sums=(), path=None):
        """Clips one tensor, for `per_tensor` rules.

        Args:
            grad: The gradient tensor.
            param: Its weight's value (a tensor), or `None`; only rules that
                need weights read it.
            threshold: This step's threshold, from `step_threshold`.
            square: Float32 scalar, the sum of squares of `grad`.
            sums: Float32 scalars, the sums over `grad` of the functions
                from `tensor_terms(threshold)`, in order.
            path: The weight's variable path, or `None`.

        Returns:
            A tuple `(clipped, clipped_square, clipped_flag)`: the clipped
            tensor, its float32 sum of squares, and whether clipping changed
            it (bool scalar).
        """
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        from keras.saving import deserialize_keras_object

        config = dict(config)
        for key, value in config.items():
            if isinstance(value, dict) and "class_name" in value:
                config[key] = deserialize_keras_object(value)
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # Helpers for subclasses.

    def _bind(self, variables):
        """Called by the optimizer with its dict of state variables."""
        self._variables = variables

    @staticmethod
    def _threshold_state(value):
        if isinstance(value, LearningRateSchedule):
            value = 0.0  # A schedule's value is written on every step.
        return np.asarray(value, "float32")

    @staticmethod
    def _threshold_value(value, state, step):
        if isinstance(value, LearningRateSchedule):
            return ops.cast(value(0 if step is None else step), "float32")
        return state["threshold"]

    @staticmethod
    def _serialize(value):
        if isinstance(value, LearningRateSchedule):
            from keras.saving import serialize_keras_object

            return serialize_keras_object(value)
        return value


def per_tensor_info(squares_after, flags):
    """The optimizer's `info` from per-tensor results (see `clip_tensor`)."""
    if not flags:
        return {"clipped": ops.array(False), "clipped_norm": ops.zeros((), "float32")}
    return {
        "clipped": ops.any(ops.stack([ops.cast(f, "bool") for f in flags])),
        "clipped_norm": ops.sqrt(ops.sum(ops.stack(squares_after))),
    }
