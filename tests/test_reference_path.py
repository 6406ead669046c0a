"""The clippers' NumPy references, checked through the path training runs.

tests/test_clippers.py and tests/test_adaptive.py check each rule by calling
`clipper.update`. Here the same inputs go through `optimizer.apply` of a
`ClippedSGD(learning_rate=1.0)` (tests/programs/reference_path.py), whose
update is `w <- w - g_clipped`, on each path the backend trains on
(tests/steps.py). On TensorFlow: one device with XLA ("xla"), one device
without ("graph"), and `MirroredStrategy` with two replicas, each applying a
part of the gradient ("mirrored", in a subprocess: TensorFlow must split the
CPU into two logical devices before it starts). On JAX: jitted as `fit` jits
the step ("jit", `optimizer.stateless_apply`) and eager ("eager"). On torch:
eager ("eager"), as its `fit` runs.

The applied gradient is read back from the weights: `params - w_new`. With
`params` zero (every clipper but AGC) that is `-w_new`, exact. AGC reads the
weights, so they are set to `params`; then `w_new = fl(p - g)` and
`fl(p - w_new)` differ from `g` by at most `2u(|p| + |g|)` per element (two
roundings of at most `u` each, first order in `u`).

The tolerances of the table are derived from float32's unit roundoff
`u = 2**-24` (one rounding is off by at most `u`, relative), first order in
`u`, with one `u` to spare for the second-order terms (below 1e-11 here):

- A float32 L2 norm of `n` terms: the squares and the sum of `n` positive
  terms are off by at most `n u` of the sum (Higham, "Accuracy and Stability
  of Numerical Algorithms", 4.2: `(n - 1) u` for the sum, in any order, and
  `u` for the squares); the square root halves that and rounds once:
  `(n / 2 + 1) u`.
- A clipped element, `g * fl(c / norm)`: the norm, then `c` to float32, the
  divide and the multiply: `(n / 2 + 4) u`, with `n` the largest number of
  terms in a norm, all of `SHAPES`' 95 elements. AGC takes two unit norms of
  at most 18 terms each, then the factor to float32, the product with the
  weight's norm, the divide and the multiply: `(18 + 6) u`, less.
- A statistic after clipping: a float32 norm (`(n / 2 + 1) u`) of elements
  each within the above of the reference.

The derivations bound a sum in any order, so they hold on every backend and
path, however XLA or a backend's kernels order the sums.

The adaptive loops are held to the tolerances tests/test_adaptive.py holds
`clipper.update` to for the same quantities: training must keep the rule's
contract, not a looser one.
"""

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import steps
from test_adaptive import CASES
from test_adaptive import NAN_STEP
from test_adaptive import norms64
from test_adaptive import sequence
from test_clippers import SHAPES
from test_clippers import TABLE
from test_clippers import np_norm
from test_clippers import np_units

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PROGRAM = os.path.join(TESTS, "programs", "reference_path.py")


def _load_program():
    spec = importlib.util.spec_from_file_location("reference_path", PROGRAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


program = _load_program()

MIRRORED = pytest.param(
    "mirrored",
    marks=[
        pytest.mark.slow,
        pytest.mark.tensorflow(reason="MirroredStrategy is TensorFlow's"),
    ],
)
PATHS = [*steps.PATHS, MIRRORED]
# The paths that trace the step once and reuse it (torch runs it eagerly).
TRACED = [*steps.COMPILED, MIRRORED]

U = 2.0**-24  # float32's unit roundoff
N = sum(math.prod(s) for s in SHAPES)  # 95: the most terms in any norm


def norm_rtol(n):
    """A float32 L2 norm of `n` terms against the exact one (see above)."""
    return (n / 2 + 1 + 1) * U


CLIP_RTOL = (N / 2 + 4 + 1) * U
STAT_RTOL = CLIP_RTOL + norm_rtol(N)
# ValueClip compares each element with the same float32 bound NumPy does
# (NumPy 2 casts the Python float to the array's float32): exact.
RTOL = {"value": 0.0, "norm": CLIP_RTOL, "global_norm": CLIP_RTOL, "agc": CLIP_RTOL}
# As tests/test_adaptive.py checks the threshold and the clipped norm.
ADAPTIVE_RTOL, ADAPTIVE_ATOL = 1e-5, 1e-6


def _run_mirrored(directory):
    out = os.path.join(directory, "runs.npz")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, PROGRAM, out], capture_output=True, text=True,
        timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs, replicas = program.load(out)
    assert replicas == 2
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(path, key)`: the run of `key` ("table/agc", "adaptive/zclip")."""
    cache = {}

    def get(path, key):
        if path == "mirrored":
            if path not in cache:
                cache[path] = _run_mirrored(tmp_path_factory.mktemp("mirrored"))
            return cache[path][key]
        if (path, key) not in cache:
            kind, name = key.split("/")
            if kind == "table":
                for clipper, run in program.run_table(path).items():
                    cache[path, f"table/{clipper}"] = run
            else:
                cache[path, key] = program.run_adaptive(name, path)
        return cache[path, key]

    return get


def step_of(run, label):
    """`(weights, stats, clipped)` of one step; `clipped`: did it count one."""
    i = run["labels"].index(label)
    before = run["stats"][i - 1]["clipped_steps"] if i else 0
    stats = run["stats"][i]
    return run["weights"][i], stats, stats["clipped_steps"] - before


def assert_applied(weights, params, expected, rtol):
    """The applied gradient, `params - weights`, is `expected` within `rtol`.

    Plus reading it back from the weights: `2u(|p| + |g|)` where `p` is not
    zero (see above; `|expected|` stands for `|g|`, they differ by `rtol`:
    second order), nothing where it is (`0 - g` and `0 - (0 - g)` are exact).
    """
    for i, (w, p, e) in enumerate(zip(weights, params, expected)):
        p = np.asarray(p, "float32")
        got = (p - w).astype(np.float64)
        reading = np.where(p != 0, 2 * U * (np.abs(p) + np.abs(e)), 0.0)
        bound = rtol * np.abs(e) + reading
        excess = np.abs(got - e) - bound
        assert got.shape == np.shape(e), i
        assert np.all(excess <= 0), (
            f"tensor {i}: off by {np.max(np.abs(got - e)):.3g}, "
            f"{np.max(excess):.3g} over the bound"
        )


def global_norm64(tensors):
    return math.sqrt(sum(np_norm(np.asarray(t)) ** 2 for t in tensors))


# The table: clipped gradients and statistics against the NumPy reference.


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TABLE)
@pytest.mark.parametrize("seed", program.SEEDS)
@pytest.mark.parametrize("scale", program.SCALES)
def test_apply_matches_numpy_reference(name, seed, scale, path, runs):
    _, ref = TABLE[name]
    grads, params = program.table_inputs()[f"{seed}/{scale}"]
    weights, stats, clipped = step_of(runs(path, f"table/{name}"), f"{seed}/{scale}")
    expected = ref(grads, params)
    assert_applied(weights, program.start_weights(name, params), expected, RTOL[name])
    np.testing.assert_allclose(stats["grad_norm"], global_norm64(grads), rtol=norm_rtol(N))
    np.testing.assert_allclose(
        stats["clipped_grad_norm"], global_norm64(expected), rtol=STAT_RTOL
    )
    changed = any(not np.array_equal(e, g) for e, g in zip(expected, grads))
    assert clipped == changed


@pytest.mark.parametrize("path", TRACED)
def test_each_optimizer_traces_its_step_once(path, runs):
    for name in TABLE:
        assert runs(path, f"table/{name}")["traces"] == 1, name


@pytest.mark.parametrize("path", steps.PATHS)
def test_the_table_comparison_rejects_a_threshold_one_percent_off(path, runs):
    grads, params = program.table_inputs()["0/30.0"]
    weights, _, _ = step_of(runs(path, "table/global_norm"), "0/30.0")
    wrong = [g * (2.0 * 1.01 / global_norm64(grads)) for g in grads]
    with pytest.raises(AssertionError):
        assert_applied(weights, params, wrong, CLIP_RTOL)


# The invariants, through apply.


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TABLE)
def test_clipping_twice_equals_once(name, path, runs):
    run = runs(path, f"table/{name}")
    start = program.start_weights(name, program.table_inputs()["twice"][1])
    once = [p - w for p, w in zip(start, step_of(run, "twice")[0])]
    again, _, clipped = step_of(run, "again")
    rtol = RTOL[name]
    if name == "agc":
        # `once` was read back from the weights: each unit's norm is off by up
        # to the norm of `2u(|p| + |g|)`, which clipping again may take out.
        rtol = [
            rtol + 2 * U * (np_units(p) + np_units(g)) / np.maximum(np_units(g), 1e-30)
            for p, g in zip(start, once)
        ]
        for w, p, g, r in zip(again, start, once, rtol):
            assert_applied([w], [p], [g.astype(np.float64)], r)
        return
    assert_applied(again, start, [g.astype(np.float64) for g in once], rtol)
    if name == "value":
        assert not clipped


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TABLE)
def test_inside_the_bound_applies_the_gradient_bit_for_bit(name, path, runs):
    grads, params = program.table_inputs()["inside"]
    weights, _, clipped = step_of(runs(path, f"table/{name}"), "inside")
    for w, p, g in zip(weights, program.start_weights(name, params), grads):
        assert np.array_equal(w, p - g)  # SGD's one float32 subtraction
    assert not clipped


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TABLE)
def test_zero_gradient_stays_zero(name, path, runs):
    _, params = program.table_inputs()["zero"]
    weights, stats, clipped = step_of(runs(path, f"table/{name}"), "zero")
    for w, p in zip(weights, program.start_weights(name, params)):
        assert np.array_equal(w, p)
    assert stats["grad_norm"] == 0.0 and stats["clipped_grad_norm"] == 0.0
    assert not clipped


@pytest.mark.parametrize("path", PATHS)
def test_bounds_hold_after_clipping(path, runs):
    _, params = program.table_inputs()["bounds"]

    def applied(name):
        weights, _, _ = step_of(runs(path, f"table/{name}"), "bounds")
        return [p - w for p, w in zip(program.start_weights(name, params), weights)]

    # Read back exactly but for AGC's; bounded by the threshold within the
    # clipped elements' rounding.
    assert max(np.abs(g).max() for g in applied("value")) <= np.float32(0.3)
    assert max(np_norm(g) for g in applied("norm")) <= 1.5 * (1 + CLIP_RTOL)
    assert global_norm64(applied("global_norm")) <= 2.0 * (1 + CLIP_RTOL)
    for g, p in zip(applied("agc"), params):
        # Plus the norm of reading back `2u(|p| + |g|)`.
        bound = 0.05 * np.maximum(np_units(p), 1e-3) * (1 + CLIP_RTOL)
        assert np.all(np_units(g) <= bound + 2 * U * (np_units(p) + np_units(g)))


@pytest.mark.parametrize("path", PATHS)
def test_global_norm_scales_every_tensor_by_one_factor(path, runs):
    grads, params = program.table_inputs()["one_factor"]
    weights, _, _ = step_of(runs(path, "table/global_norm"), "one_factor")
    ratios = [np_norm(-w) / np_norm(g) for w, g in zip(weights, grads)]
    # Each element is `fl(g * s)` for one float32 `s`: each tensor's norm is
    # `s ||g||` within `u`, two of them within `2u` (plus 1 to spare).
    np.testing.assert_allclose(ratios, ratios[0], rtol=3 * U)
    assert ratios[0] < 1


# The adaptive clippers: the NumPy loop, step by step.


def assert_follows_reference(run, ref, path):
    """Each step's threshold and clipped norm are the reference's.

    The NaN step applies nothing: the weights stay exactly zero, and the
    reference state matches on every later step. A compiled `path` traced
    its step once.
    """
    grads = sequence()
    rows = zip(run["labels"], run["weights"], run["stats"])
    for k, (t, weights, stats) in enumerate(rows):
        threshold, clipped_norm = ref.step(grads[t])
        np.testing.assert_allclose(
            stats["clip_threshold"], threshold, rtol=ADAPTIVE_RTOL, err_msg=f"step {t}"
        )
        assert stats["steps"] == k + 1, t
        assert stats["nonfinite_steps"] == int(t >= NAN_STEP), t
        if t == NAN_STEP:
            assert all(np.all(w == 0) for w in weights), t
            continue
        _, applied_norm = norms64([-w for w in weights])
        for norm in (applied_norm, stats["clipped_grad_norm"]):
            np.testing.assert_allclose(
                norm, clipped_norm, rtol=ADAPTIVE_RTOL, atol=ADAPTIVE_ATOL,
                err_msg=f"step {t}",
            )
    assert NAN_STEP in run["labels"]
    assert run["stats"][-1]["clipped_steps"] > 0
    if path != "eager":
        assert run["traces"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_adaptive_steps_match_the_numpy_rule(case, path, runs):
    _, make_ref = CASES[case]
    assert_follows_reference(runs(path, f"adaptive/{case}"), make_ref(), path)


class ThresholdOnePercentHigh:
    def __init__(self, ref):
        self.ref = ref

    def step(self, grads):
        threshold, clipped_norm = self.ref.step(grads)
        return threshold * 1.01, clipped_norm


@pytest.mark.parametrize("path", steps.PATHS)
def test_the_adaptive_comparison_rejects_a_threshold_one_percent_off(path, runs):
    _, make_ref = CASES["zclip"]
    wrong = ThresholdOnePercentHigh(make_ref())
    with pytest.raises(AssertionError):
        assert_follows_reference(runs(path, "adaptive/zclip"), wrong, path)
