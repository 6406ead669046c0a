"""Loading a `.keras` file saved with a keras-clip optimizer, in a fresh Python.

Keras finds a registered class only once the module that registers it has
been imported: `keras.models.load_model` needs `import keras_clip` first.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_clip as kc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh Python: loads the file (argv[1]), importing keras_clip first
# only if argv[2] is "import", and prints what it found as JSON.
LOAD = """
import json
import sys

import keras
import numpy as np

if sys.argv[2] == "import":
    import keras_clip
try:
    model = keras.models.load_model(sys.argv[1])
    error = None
except Exception as err:
    error = err
out = {"imported": "keras_clip" in sys.modules}
if error is not None:
    out.update(error=type(error).__name__, message=str(error))
else:
    import keras_clip

    opt = model.optimizer
    out.update(
        is_clipped_adam=type(opt) is keras_clip.ClippedAdam,
        clipper=keras.saving.serialize_keras_object(opt.clipper),
        config=opt.get_config(),
        variables=[[str(v.dtype), np.asarray(v).tolist()] for v in opt.variables],
        stats=opt.gradient_stats(),
    )
print(json.dumps(out))
"""


def load_in_fresh_python(path, import_first):
    env = dict(
        os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=ROOT,
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), "import" if import_first else "no"],
        capture_output=True, text=True, timeout=300, env=env,
        cwd=os.path.dirname(path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model trained 3 steps with `ClippedAdam(global_clipnorm=1.0)`, saved."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = kc.ClippedAdam(global_clipnorm=1.0)
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3)).astype("float32")
    y = (10 * rng.standard_normal((24, 2))).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert opt.gradient_stats()["clipped_steps"] > 0
    path = tmp_path_factory.mktemp("loading") / "model.keras"
    model.save(path)
    return path, opt


@pytest.mark.slow
def test_loading_without_import_keras_clip_fails_naming_the_module(saved):
    path, _ = saved
    out = load_in_fresh_python(path, import_first=False)
    assert not out["imported"]  # Keras does not import it by itself
    assert out["error"] == "TypeError"
    # Keras's message quotes the object's config, `module` included: it names
    # the package to import.
    assert "Could not locate class 'ClippedAdam'" in out["message"]
    assert "'module': 'keras_clip.optimizers'" in out["message"]


@pytest.mark.slow
def test_loading_after_import_keras_clip_restores_optimizer_and_state(saved):
    path, opt = saved
    out = load_in_fresh_python(path, import_first=True)
    assert "error" not in out, out.get("message")
    assert out["is_clipped_adam"]
    assert out["clipper"] == keras.saving.serialize_keras_object(opt.clipper)
    assert out["clipper"]["class_name"] == "GlobalNormClip"
    assert out["clipper"]["config"] == {"max_norm": 1.0}
    assert out["config"] == json.loads(json.dumps(opt.get_config()))
    # Every optimizer variable (Adam's moments, the step count, the clipper's
    # state and the statistics) comes back bit for bit, in the same order.
    # (Not under the same paths: Keras names the moments after the model's
    # variables when the optimizer is built, `sequential_dense_...` before
    # saving and `dense_...` after loading, for its own Adam too.)
    expected = [[str(v.dtype), np.asarray(v).tolist()] for v in opt.variables]
    assert out["variables"] == expected
    np.testing.assert_equal(out["stats"], opt.gradient_stats())
