"""Doctest namespace: docstring examples run with these names."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow keeps CPU memory statistics (tests/test_performance.py measures a
# step's peak) only with its BFC allocator, which it turns on by default only
# where oneDNN is on (AVX-512 CPUs). Asking for it makes the measurement the
# same on every CPU. It must be set before TensorFlow starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_clip  # noqa: E402

# Programs the tests run in processes of their own: importing one here would
# run it (`--doctest-modules` imports every module it collects).
collect_ignore_glob = ["tests/programs/*"]


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["np"] = np
    doctest_namespace["keras"] = keras
    doctest_namespace["kc"] = keras_clip
    for name in keras_clip.__all__:
        doctest_namespace[name] = getattr(keras_clip, name)
