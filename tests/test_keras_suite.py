"""Keras's own optimizer tests, run on the `Clipped*` classes.

A `Clipped*` optimizer is a drop-in for its Keras class. Keras ships its test
modules (`keras/src/optimizers/*_test.py`); each is imported from the
installed Keras, the optimizer class it tests is swapped for its `Clipped*`
class, and its test cases run here unchanged, but for those in `LEFT_OUT`,
each with the reason it does not apply.
"""

import importlib
import types
import unittest

import pytest
from keras.src import optimizers as keras_optimizers

import keras_clip as kc

# Keras's test module -> the class names its tests build.
MODULES = {
    "adadelta_test": ["Adadelta"],
    "adafactor_test": ["Adafactor"],
    "adagrad_test": ["Adagrad"],
    "adam_test": ["Adam"],
    "adamax_test": ["Adamax"],
    "adamw_test": ["AdamW"],
    "ftrl_test": ["Ftrl"],
    "lamb_test": ["Lamb"],
    "lion_test": ["Lion"],
    "muon_test": ["Muon"],
    "nadam_test": ["Nadam"],
    "rmsprop_test": ["RMSprop"],
    "schedule_free_adamw_test": ["ScheduleFreeAdamW"],
    "sgd_test": ["SGD"],
    "loss_scale_optimizer_test": ["SGD"],  # a Clipped SGD inside Keras's wrapper
    "optimizer_test": None,  # builds through `optimizers.X`: all swapped
}

# (test case, test) -> why it does not apply to keras-clip.
LEFT_OUT = {
    ("*", "test_clip_norm"): "calls the private `_clip_gradients`; keras-clip clips in its step",
    ("*", "test_clip_value"): "calls the private `_clip_gradients`",
    ("*", "test_global_clip_norm"): "calls the private `_clip_gradients`",
    ("OptimizerTest", "test_clip_args"): (
        "pins Keras's message 'Only one of `clipnorm`, ...'; keras-clip's also names "
        "`clipper` (tests/test_optimizers.py); the attributes it reads are checked"
    ),
    ("OptimizerTest", "test_get_method"): "`optimizers.get('sgd')` returns Keras's own class",
    ("OptimizerTest", "test_optimizer_auto_naming"): "the classes are named Clipped*",
    ("SGDTest", "test_single_step"): (
        "counts the optimizer's variables; keras-clip keeps its statistics there too"
    ),
}


class _ClippedOptimizers(types.ModuleType):
    """`keras.src.optimizers`, with every optimizer class swapped for its Clipped*."""

    def __getattr__(self, name):
        return getattr(kc, f"Clipped{name}", None) or getattr(keras_optimizers, name)


def _reason(case, test):
    return LEFT_OUT.get((case, test)) or LEFT_OUT.get(("*", test))


def _ported(module_name, classes):
    try:
        module = importlib.import_module(f"keras.src.optimizers.{module_name}")
    except ImportError:  # this Keras did not ship its tests
        return {}
    if classes is None:
        module.optimizers = _ClippedOptimizers("optimizers")
    for name in classes or ():
        setattr(module, name, getattr(kc, f"Clipped{name}"))
    out = {}
    for name, case in vars(module).items():
        if not (isinstance(case, type) and issubclass(case, unittest.TestCase)):
            continue
        if case.__module__ != module.__name__:
            continue
        body = {}
        for test in dir(case):
            reason = _reason(name, test) if test.startswith("test") else None
            if reason:
                body[test] = pytest.mark.skip(reason=reason)(getattr(case, test))
        out[f"TestClipped{name}"] = type(f"TestClipped{name}", (case,), body)
    return out


for _module, _classes in MODULES.items():
    globals().update(_ported(_module, _classes))


def test_the_port_found_keras_tests():
    ported = [name for name in globals() if name.startswith("TestClipped")]
    try:
        importlib.import_module("keras.src.optimizers.adam_test")
    except ImportError:
        pytest.skip("this Keras does not ship its tests")
    assert len(ported) >= len(MODULES), ported
