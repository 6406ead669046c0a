import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")


def pytest_collection_modifyitems(config, items):
    """A test marked with backends (`@pytest.mark.tensorflow`, ...) runs
    only under those; the marker's `reason=` says why."""
    backend = keras.backend.backend()
    for item in items:
        marks = [m for m in item.iter_markers() if m.name in BACKENDS]
        if marks and backend not in {m.name for m in marks}:
            names = " or ".join(sorted({m.name for m in marks}))
            reasons = "; ".join(m.kwargs.get("reason", "") for m in marks if m.kwargs)
            item.add_marker(
                pytest.mark.skip(reason=f"{names} only" + (f": {reasons}" if reasons else ""))
            )


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")
