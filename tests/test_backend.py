"""Guard: every private Keras name keras-clip uses lives in keras_clip/backend/,
is listed there (`HOOKS`), and exists in the installed Keras.

A Keras release that moves an internal fails here, naming it, and breaks
only keras_clip/backend/.
"""

import ast
import inspect
import pathlib

import keras
import numpy as np
import pytest
from keras.src.backend.tensorflow.optimizer import TFOptimizer
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.trainers.trainer import Trainer

import keras_clip as kc
from keras_clip.backend import optimizer as backend_optimizer
from keras_clip.backend import training as backend_training

PACKAGE = pathlib.Path(kc.__file__).parent
HOOKS = backend_optimizer.HOOKS + backend_training.HOOKS
OWNERS = {"BaseOptimizer": BaseOptimizer, "TFOptimizer": TFOptimizer, "Trainer": Trainer}
# The parameters keras-clip relies on, for the hooks that are methods.
SIGNATURES = {
    "_backend_apply_gradients": ["self", "grads", "trainable_variables"],
    "_backend_update_step": ["self", "grads", "trainable_variables", "learning_rate"],
    "_apply_weight_decay": ["self", "variables"],
    "_clip_gradients": ["self", "grads"],
    "_use_weight_decay": ["self", "variable"],
    "_get_current_learning_rate": ["self"],
    "_backend_reset_gradient_accumulators": ["self"],
    "_backend_increment_gradient_accumulators": ["self", "grads", "acc_grads"],
    "_get_variable_index": ["self", "variable"],
    "_update_model_variables_moving_average": ["self", "trainable_variables"],
    "_overwrite_model_variables_with_average_value": ["self", "trainable_variables"],
    "_distributed_tf_update_step": ["self", "distribution", "grads_and_vars", "learning_rate"],
}
# Public methods the step overrides or calls with these parameters.
PUBLIC = {
    "assign": ["self", "variable", "value"],
    "assign_add": ["self", "variable", "value"],
    "assign_sub": ["self", "variable", "value"],
    "update_step": ["self", "gradient", "variable", "learning_rate"],
}


def _instances():
    """A built optimizer (with accumulation and EMA) and a compiled model:
    the attributes Keras sets at run time."""
    opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2, use_ema=True)
    opt.build([keras.Variable(np.zeros(2, "float32"))])
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return {"BaseOptimizer": opt, "TFOptimizer": opt, "Trainer": model}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_listed_internal_exists(hook):
    owner, name = hook.split(".")
    cls = OWNERS[owner]
    found = hasattr(cls, name) or hasattr(_instances()[owner], name)
    assert found, (
        f"keras-clip uses {hook}, which Keras {keras.__version__} no longer "
        "has: see keras_clip/backend/."
    )
    if name in SIGNATURES:
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got == SIGNATURES[name], (
            f"keras-clip relies on {hook}{tuple(SIGNATURES[name])}; Keras "
            f"{keras.__version__} changed it to {tuple(got)}."
        )


@pytest.mark.parametrize("name", PUBLIC)
def test_public_methods_the_step_relies_on(name):
    got = list(inspect.signature(getattr(BaseOptimizer, name)).parameters)
    assert got == PUBLIC[name]


def _keras_private_names():
    """Every private (single underscore) name of Keras's optimizer, model,
    callback and their instances."""
    names = set()
    for obj in [BaseOptimizer, TFOptimizer, Trainer, keras.Model,
                keras.callbacks.Callback, keras.optimizers.LossScaleOptimizer,
                *_instances().values()]:
        names |= set(dir(obj))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_names(path):
    """Private attribute names a module reads, assigns or defines as methods."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # getattr(model, "_loss_tracker")
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _modules(inside_backend):
    for path in sorted(PACKAGE.rglob("*.py")):
        if (path.parent.name == "backend") == inside_backend:
            yield path


def test_no_keras_internal_outside_backend():
    keras_names = _keras_private_names()
    found = {
        str(path.relative_to(PACKAGE)): sorted(_private_names(path) & keras_names)
        for path in _modules(inside_backend=False)
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_every_keras_internal_in_backend_is_listed():
    keras_names = _keras_private_names()
    used = set()
    for path in _modules(inside_backend=True):
        used |= _private_names(path) & keras_names
    listed = {hook.split(".")[1] for hook in HOOKS}
    assert used - listed == set(), "used in keras_clip/backend/ but not in HOOKS"
    assert listed - used == set(), "listed in HOOKS but no longer used"


def test_the_scan_finds_a_keras_internal():
    # The scan above can fail: this source reads two Keras internals.
    source = "def f(opt):\n    return opt._iterations, getattr(opt, '_trainable_variables')\n"
    path = pathlib.Path(__file__).parent / "_scan_probe_tmp.py"
    path.write_text(source)
    try:
        found = _private_names(path) & _keras_private_names()
    finally:
        path.unlink()
    assert found == {"_iterations", "_trainable_variables"}


@pytest.mark.tensorflow(reason="tf.distribute: the step all-reduces through it only on TensorFlow")
def test_tf_distribute_api_the_step_relies_on():
    import tensorflow as tf

    for name in ("all_reduce", "merge_call", "num_replicas_in_sync"):
        assert hasattr(tf.distribute.ReplicaContext, name), name
    assert hasattr(tf.distribute.StrategyExtended, "update")


@pytest.mark.parametrize("jit_compile", [True, False])
def test_the_step_knows_whether_xla_compiles_it(jit_compile):
    # `backend.compiled_by_xla` (on TensorFlow a private TF name) decides how
    # `keras_clip.ops.entries` takes a vector's entries; it must follow
    # `model.compile(jit_compile=...)` (torch compiles never).
    seen = []

    class Probe(kc.GlobalNormClip):
        def update(self, grads, *args, **kwargs):
            seen.append(kc.backend.compiled_by_xla(grads[0]))
            return super().update(grads, *args, **kwargs)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(kc.ClippedSGD(clipper=Probe()), loss="mse", jit_compile=jit_compile)
    model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), verbose=0)
    assert seen[-1] is (jit_compile and keras.backend.backend() != "torch")
    assert kc.backend.compiled_by_xla(keras.ops.ones(2)) is False  # eager


def test_loss_scale_optimizer_api_the_step_relies_on():
    lso = keras.optimizers.LossScaleOptimizer(kc.ClippedSGD(0.1))
    lso.build([keras.Variable(np.zeros(2, "float32"))])
    assert hasattr(lso, "inner_optimizer") and hasattr(lso, "dynamic_scale")


@pytest.mark.parametrize("accumulation", [None, 2])
def test_iterations_advance_as_keras_counts_them(accumulation):
    """keras-clip replaces `_backend_apply_gradients`, inside which Keras
    before 3.10 counted the step (`backend.optimizer.COUNTS_STEP_IN_BACKEND_APPLY`):
    on every supported Keras the count moves as Keras's own, and every update
    is a step of the statistics (a frozen count never applied an accumulated
    update and broke Adam's bias correction)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    counts = []
    for cls in (keras.optimizers.Adam, kc.ClippedAdam):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        opt = cls(1e-2, gradient_accumulation_steps=accumulation)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 batches
        counts.append(int(keras.ops.convert_to_numpy(opt.iterations)))
    assert counts[0] == counts[1] > 0
    assert opt.gradient_stats()["steps"] == 4 // (accumulation or 1)
