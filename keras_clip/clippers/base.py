"""The `Clipper` base class: one protocol for every clip rule."""

import functools

import numpy as np
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

from keras_clip import _checks
from keras_clip import ops as kc_ops


class Clipper:
    """Base class of keras-clip's clippers: a pure rule and its state layout.

    Every rule, per-tensor, global or adaptive, implements one protocol
    (optax's `init`/`update`, with the state kept in optimizer variables):

    ```
    state = clipper.init_state(variables)      # in build(): name -> NumPy array
    clipped, new_state, info = clipper.update(grads, state, params,
                                              step=step, sums=sums)
    ```

    - `state`: the current values of the variables the optimizer made from
      `init_state`; `new_state` has the same keys, its `"threshold"` entry
      the threshold used on this step.
    - `info`: the two scalars the optimizer records as statistics,
      `"clipped"` (bool: did clipping change anything) and `"clipped_norm"`
      (float32: the global norm after clipping), taken without another pass
      over the gradients.
    - `sums`: a float32 matrix, one row per gradient: its sum of squares,
      then the sums of the functions from `tensor_terms(state, step)`. The
      optimizer takes them all in the one pass over the gradients that the
      non-finite check needs anyway; `None` makes `update` take them itself.
    - `params`: the matching weights (variables or tensors), for rules that
      read them.

    A rule that clips each tensor from its own gradient, weight and sums,
    and whose state a step leaves alone (it only reads a threshold), sets
    `separable = True`: `update` on a list is then `update` on each tensor
    alone, and the optimizer may clip each tensor right before its own
    update, while it is in cache (an execution detail:
    `InOrder` in `keras_clip/backend/optimizer.py`).

    Thresholds a user may change mid-training are `Threshold` attributes:
    they live in state variables, so a new value takes effect on the next
    step without re-tracing. Every other argument is compiled into the step:
    changing it once an optimizer is built raises.
    """

    _state_variables = None
    separable = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "update" in cls.__dict__:
            cls.update = _accepting_numpy(cls.__dict__["update"])

    def init_state(self, variables):
        """Initial state: a dict of name -> NumPy array (shape, dtype, value).

        Args:
            variables: The model variables the optimizer is built with.
        """
        raise NotImplementedError

    def tensor_terms(self, state, step):
        """Elementwise functions whose sums over each gradient `update` needs.

        Each maps a gradient (in its own dtype) to a tensor of its shape; the
        optimizer sums their values in float32 (`ops.tensor_sums`), next to
        the sums of squares. Defaults to none.
        """
        return ()

    def update(self, grads, state, params=None, *, step=None, sums=None):
        """Clips `grads`.

        Args:
            grads: List of gradient tensors (no `None`; a sparse gradient's
                rows).
            state: Dict of the current state tensors, as from `init_state`.
            params: List of the matching weights; only rules that need
                weights read them.
            step: The optimizer's update count, for schedules.
            sums: Optional float32 matrix of the gradients' sums (see the
                class docstring).

        Returns:
            A tuple `(clipped_grads, new_state, info)`.
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

    def __setattr__(self, name, value):
        if (
            self._state_variables is not None
            and not isinstance(getattr(type(self), name, None), Threshold)
            and name in self.get_config()
        ):
            raise ValueError(
                f"`{name}` is compiled into the step of the optimizer this "
                f"clipper belongs to, and cannot change once it is built. "
                f"Make a new optimizer with a new clipper. "
                f"Received: {name}={value!r}"
            )
        super().__setattr__(name, value)

    # Helpers for subclasses.

    def _bind(self, variables):
        """Called by the optimizer with its dict of state variables."""
        self._state_variables = variables

    def _sums(self, grads, state, step, sums):
        """`sums` as the optimizer passes them, or taken here if `None`."""
        if sums is None:
            sums = kc_ops.tensor_sums(grads, self.tensor_terms(state, step))
        return sums

    def _current(self, name, state, step):
        """This step's value of the `Threshold` attribute `name` (float32)."""
        value = getattr(self, name)
        if isinstance(value, LearningRateSchedule):
            return ops.cast(value(0 if step is None else step), "float32")
        return state[getattr(type(self), name).key]  # (also in a subclass)

    @staticmethod
    def _serialize(value):
        if isinstance(value, LearningRateSchedule):
            from keras.saving import serialize_keras_object

            return serialize_keras_object(value)
        return value


def _tensor(x):
    """`x` as a tensor if it is a NumPy array or scalar, else `x` itself."""
    return ops.convert_to_tensor(x) if isinstance(x, (np.ndarray, np.generic)) else x


def _accepting_numpy(update):
    """`update` with NumPy inputs made tensors first: the rules use Python
    operators, which NumPy arrays and torch tensors do not mix."""

    @functools.wraps(update)
    def wrapped(self, grads, state, params=None, **kwargs):
        grads = [_tensor(g) for g in grads]
        state = {name: _tensor(value) for name, value in state.items()}
        if params is not None:
            params = [_tensor(p) for p in params]
        return update(self, grads, state, params, **kwargs)

    return wrapped


class Threshold:
    """A clipper attribute a user may change mid-training: it lives in a
    state variable.

    Before the clipper is built it is a plain attribute; `init_state` takes
    its first value from `initial`. Once an optimizer has built the clipper,
    setting a new number assigns the variable `key`, so the next step uses
    it without re-tracing.

    Args:
        key: The state entry that holds it. Defaults to `"threshold"`.
        optional: Whether `None` (no bound: `+inf` in the variable) is
            allowed. Defaults to `False`.
        schedule: Whether a `LearningRateSchedule` is allowed (evaluated on
            the update count each step; the variable then holds 0). Defaults
            to `True`.
    """

    def __init__(self, key="threshold", optional=False, schedule=True):
        self.key = key
        self.optional = optional
        self.schedule = schedule

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj.__dict__[self.name]

    def __set__(self, obj, value):
        value = self._check(value)
        variable = obj._state_variables.get(self.key) if obj._state_variables else None
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
            variable.assign(self.initial(value))
        obj.__dict__[self.name] = value

    def _check(self, value):
        if value is None and self.optional:
            return None
        if not self.schedule:
            return _checks.number(self.name, value, low=0)
        return _checks.threshold(self.name, value)

    @staticmethod
    def initial(value):
        """The variable's value for an attribute value."""
        if value is None:
            return np.asarray(np.inf, "float32")
        if isinstance(value, LearningRateSchedule):
            return np.asarray(0.0, "float32")  # written on every step
        return np.asarray(value, "float32")


def clip_to(grads, norm, threshold):
    """Global-norm clipping of `grads` (global norm `norm`) to `threshold`.

    Returns:
        `(clipped, info)`, `info` as `Clipper.update` returns it.
    """
    clipped = kc_ops.scale(grads, kc_ops.clip_scale(norm, threshold))
    info = {"clipped": norm > threshold, "clipped_norm": ops.minimum(norm, threshold)}
    return clipped, info


def global_norm(sums):
    """The global norm from a `sums` matrix (its column of squares)."""
    return ops.sqrt(ops.sum(sums[:, 0]))
