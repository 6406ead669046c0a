"""Argument checks that fail in `__init__`, in Keras's words."""

import math
import numbers

from keras.optimizers.schedules import LearningRateSchedule


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(name, value, *, low=None, high=None, low_open=True, high_open=False,
           integer=False, what=None):
    """Returns `value` as a float (int if `integer`) inside the given range.

    Raises `TypeError` for a non-number (booleans and strings included) and
    `ValueError` for NaN, infinity or a value out of range.
    """
    kind = "an integer" if integer else "a number"
    what = what or kind
    if integer:
        ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok_type = _is_real(value)
    if not ok_type:
        raise TypeError(f"`{name}` must be {what}. Received: {name}={value!r}")
    raw, value = value, (int(value) if integer else float(value))
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite. Received: {name}={raw!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        lo_v = "-inf" if low is None else low
        hi_v = "inf" if high is None else high
        raise ValueError(
            f"`{name}` must be in {lo}{lo_v}, {hi_v}{hi}. Received: {name}={raw!r}"
        )
    return value


def threshold(name, value):
    """A positive finite number or a `LearningRateSchedule`."""
    if isinstance(value, LearningRateSchedule):
        return value
    what = (
        "a positive number or a "
        "`keras.optimizers.schedules.LearningRateSchedule`"
    )
    if not _is_real(value):
        raise TypeError(f"`{name}` must be {what}. Received: {name}={value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive finite number. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        allowed = ", ".join(f'"{o}"' for o in options)
        err = ValueError if isinstance(value, str) else TypeError
        raise err(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")
    return value
