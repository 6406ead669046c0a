"""Clippers and ops against NumPy references, from one table, plus invariants."""

import math

import keras
import numpy as np
import pytest
import steps

import keras_clip as kc
from keras_clip import clippers
from keras_clip import ops as kc_ops

SHAPES = [(), (7,), (5, 3), (3, 3, 2, 4)]


def np_norm(x):
    return float(np.sqrt(np.sum(np.square(x.astype(np.float64)))))


def np_units(x):
    """Unit norms in Keras's layout: reduce all axes but the last (rank >= 2)."""
    x = x.astype(np.float64)
    if x.ndim <= 1:
        return np.sqrt(np.sum(x * x))
    return np.sqrt(np.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))


def ref_value(grads, params, c):
    return [np.clip(g, -c, c) for g in grads]


def ref_norm(grads, params, c):
    return [g * (c / np_norm(g)) if np_norm(g) > c else g for g in grads]


def ref_global(grads, params, c):
    n = math.sqrt(sum(np_norm(g) ** 2 for g in grads))
    return [g * (c / n) if n > c else g for g in grads]


def ref_agc(grads, params, cf, eps=1e-3):
    out = []
    for g, p in zip(grads, params):
        max_norm = cf * np.maximum(np_units(p), eps)
        gn = np_units(g)
        scale = np.where(gn > max_norm, max_norm / np.where(gn > 0, gn, 1), 1.0)
        out.append(g * scale)
    return out


# One table: (make clipper, NumPy reference, per-tensor bound check).
TABLE = {
    "value": (lambda: kc.ValueClip(0.3), lambda g, p: ref_value(g, p, 0.3)),
    "norm": (lambda: kc.NormClip(1.5), lambda g, p: ref_norm(g, p, 1.5)),
    "global_norm": (lambda: kc.GlobalNormClip(2.0), lambda g, p: ref_global(g, p, 2.0)),
    "agc": (lambda: kc.AdaptiveGradClip(0.05), lambda g, p: ref_agc(g, p, 0.05)),
}


def random_lists(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(s) * scale).astype("float32") for s in SHAPES]
    params = [rng.standard_normal(s).astype("float32") for s in SHAPES]
    return grads, params


def run(clipper, grads, params):
    state = {k: np.asarray(v) for k, v in clipper.init_state(params).items()}
    out, new_state, info = clipper.update(grads, state, params)
    return [np.asarray(o) for o in out], new_state, info


@pytest.mark.parametrize("name", TABLE)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_matches_numpy_reference(name, seed, scale):
    make, ref = TABLE[name]
    grads, params = random_lists(seed, scale)
    out, _, info = run(make(), grads, params)
    expected = ref(grads, params)
    for o, e, g in zip(out, expected, grads):
        assert o.shape == g.shape and o.dtype == g.dtype
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-7)
    # The statistics the clipper reports match the result.
    np.testing.assert_allclose(
        float(info["clipped_norm"]), math.sqrt(sum(np_norm(o) ** 2 for o in out)),
        rtol=1e-5,
    )
    changed = any(not np.array_equal(o, g) for o, g in zip(out, grads))
    assert bool(info["clipped"]) == changed


@pytest.mark.parametrize("name", TABLE)
def test_clipping_twice_equals_once(name):
    make, _ = TABLE[name]
    grads, params = random_lists(3, 30.0)
    once, _, _ = run(make(), grads, params)
    twice, _, _ = run(make(), once, params)
    for a, b in zip(once, twice):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", TABLE)
def test_inside_the_bound_is_returned_bit_for_bit(name):
    make, _ = TABLE[name]
    grads, params = random_lists(4, 1e-4)
    out, _, info = run(make(), grads, params)
    for o, g in zip(out, grads):
        assert np.array_equal(o, g)
    assert not bool(info["clipped"])


@pytest.mark.parametrize("name", TABLE)
def test_zero_gradient_stays_zero(name):
    make, _ = TABLE[name]
    grads = [np.zeros(s, "float32") for s in SHAPES]
    _, params = random_lists(5)
    params[1] = np.zeros_like(params[1])  # a zero weight too (AGC's epsilon)
    out, _, info = run(make(), grads, params)
    for o in out:
        assert np.all(o == 0) and np.all(np.isfinite(o))
    assert float(info["clipped_norm"]) == 0.0


def test_bounds_hold_after_clipping():
    grads, params = random_lists(6, 50.0)
    out, _, _ = run(kc.ValueClip(0.3), grads, params)
    assert max(np.abs(o).max() for o in out) <= 0.3
    out, _, _ = run(kc.NormClip(1.5), grads, params)
    assert max(np_norm(o) for o in out) <= 1.5 * (1 + 1e-6)
    out, _, _ = run(kc.GlobalNormClip(2.0), grads, params)
    assert math.sqrt(sum(np_norm(o) ** 2 for o in out)) <= 2.0 * (1 + 1e-6)
    out, _, _ = run(kc.AdaptiveGradClip(0.05), grads, params)
    for o, p in zip(out, params):
        assert np.all(np_units(o) <= 0.05 * np.maximum(np_units(p), 1e-3) * (1 + 1e-6))


def test_global_norm_scales_every_tensor_by_one_factor():
    grads, params = random_lists(7, 10.0)
    out, _, _ = run(kc.GlobalNormClip(1.0), grads, params)
    ratios = [np_norm(o) / np_norm(g) for o, g in zip(out, grads)]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    assert ratios[0] < 1


def test_agc_uses_the_last_axis_as_unit():
    # Two output units of a Dense kernel (in=2, out=2): only the second clips.
    g = np.array([[3.0, 30.0], [4.0, 40.0]], "float32")
    w = np.array([[300.0, 3.0], [400.0, 4.0]], "float32")
    out = np.asarray(kc.ops.adaptive_grad_clip([g], [w], clip_factor=0.1)[0])
    np.testing.assert_allclose(out[:, 0], g[:, 0])
    np.testing.assert_allclose(np.linalg.norm(out[:, 1]), 0.5, rtol=1e-6)


def test_agc_exclude_and_axis():
    grads, params = random_lists(8, 30.0)
    paths = ["a/bias", "dense/kernel", "predictions/kernel", "conv/kernel"]

    class P:  # a weight with a path, like a keras.Variable
        def __init__(self, value, path):
            self.value, self.path = value, path

    named = [P(p, n) for p, n in zip(params, paths)]
    clip = kc.AdaptiveGradClip(0.05, exclude=["predictions"])
    out, _, _ = run(clip, grads, named)
    np.testing.assert_array_equal(out[2], grads[2])
    assert not np.array_equal(out[1], grads[1])
    # axis=0 on a Dense kernel is the default unit; axis=(0, 1) on a conv
    # kernel reduces the spatial axes only.
    unit = kc.ops.unitwise_norm(params[3], axis=(0, 1))
    assert tuple(unit.shape) == (1, 1, 2, 4)


@pytest.mark.parametrize("run_as", ["eager", "graph", "compiled"])
@pytest.mark.parametrize("axis", [None, (0, 1), -1])
def test_agc_on_many_tensors_of_one_shape_matches_numpy(run_as, axis):
    # Without XLA, same-shaped tensors take AGC's operations stacked (one
    # each for all, `ops.adaptive_clip_factors`); under XLA one tensor at a
    # time. Both are the per-tensor rule: three kernels of one shape, two
    # biases, two 3-D kernels, a scalar, one of another dtype (an `axis`
    # applies to every tensor: only the ranks it fits).
    rng = np.random.default_rng(11)
    shapes = [(4, 3), (3,), (4, 3), (2, 2, 3), (4, 3), (3,), (2, 2, 3), ()]
    fits = {None: 0, (0, 1): 2, -1: 1}[axis]
    shapes = [s for s in shapes if len(s) >= fits]
    grads = [(rng.standard_normal(s) * 10).astype("float32") for s in shapes]
    params = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads.append(rng.standard_normal((4, 3)).astype("float16"))
    params.append(rng.standard_normal((4, 3)).astype("float16"))
    clipper = kc.AdaptiveGradClip(0.05, axis=axis)
    state = {k: np.asarray(v) for k, v in clipper.init_state(params).items()}

    def clip(gs, ps):
        out, _, info = clipper.update(gs, state, ps)
        return out, info["clipped_norm"], info["clipped"]

    if run_as == "graph":
        import tensorflow as tf

        clip = tf.function(clip, jit_compile=False)
    elif run_as == "compiled":
        clip = steps.compiled(clip)
    if run_as == "graph" and keras.backend.backend() != "tensorflow":
        pytest.skip("a graph without XLA is TensorFlow's")
    out, clipped_norm, clipped = clip(grads, params)

    def units(x):  # float64 unit norms, reduced axes kept
        x = x.astype(np.float64)
        axes = (tuple(range(x.ndim - 1)) if x.ndim > 1 else None) if axis is None else axis
        return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))

    total = 0.0
    for g, p, o in zip(grads, params, out):
        max_norm = 0.05 * np.maximum(units(p), 1e-3)
        n = units(g)
        expected = g.astype(np.float64) * np.where(n > max_norm, max_norm / n, 1.0)
        total += np.sum(expected**2)
        # Sums of at most 12 squares (13 roundings each), the squared bound
        # (two products), their quotient, its root and the scaling, in the
        # gradient's dtype: 16 half-ulps.
        eps = np.finfo(g.dtype).eps / 2
        np.testing.assert_allclose(np.asarray(o, "float64"), expected, rtol=20 * eps, atol=0)
    np.testing.assert_allclose(float(clipped_norm), np.sqrt(total), rtol=20 * 2**-11)
    assert bool(clipped)


def test_ops_functions_match_numpy():
    grads, params = random_lists(9, 5.0)
    np.testing.assert_allclose(
        float(kc.ops.global_norm(grads)),
        math.sqrt(sum(np_norm(g) ** 2 for g in grads)), rtol=1e-6,
    )
    clipped, norm = kc.ops.clip_by_global_norm(grads, 1.0)
    for a, b in zip(clipped, ref_global(grads, params, 1.0)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5)
    for a, b in zip(kc.ops.clip_by_norm(grads, 1.0), ref_norm(grads, params, 1.0)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5)
    for a, b in zip(kc.ops.clip_by_value(grads, 0.2), ref_value(grads, params, 0.2)):
        np.testing.assert_allclose(np.asarray(a), b)
    for a, b in zip(
        kc.ops.adaptive_grad_clip(grads, params, 0.05), ref_agc(grads, params, 0.05)
    ):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)
    # None entries pass through.
    assert kc.ops.clip_by_value([None], 1.0) == [None]


# Sparse gradients: the public ops see the dense gradient (repeated indices
# summed), and what they scale or clip stays sparse. Only TensorFlow has them
# (`tf.IndexedSlices`, from `Embedding`); JAX and torch gradients are dense.

sparse = pytest.mark.tensorflow(reason="tf.IndexedSlices are TensorFlow's sparse gradients")

# One float32 rounding is at most half an ulp, relative.
HALF_ULP = np.finfo(np.float32).eps / 2


def sparse_example():
    """Rows [1, 1] x 3 at indices [3, 3, 1] of a (5, 2) gradient."""
    import tensorflow as tf

    slices = tf.IndexedSlices(
        tf.ones((3, 2)), tf.constant([3, 3, 1]), tf.constant([5, 2])
    )
    dense = np.asarray(tf.convert_to_tensor(slices)).astype(np.float64)
    return slices, dense


def sparse_params():
    return np.arange(10, dtype="float32").reshape(5, 2)


def assert_sparse_matches(out, expected, rtol):
    """`out` is an IndexedSlices with unique indices whose dense value is `expected`."""
    import tensorflow as tf

    assert isinstance(out, tf.IndexedSlices)
    indices = np.asarray(out.indices)
    assert len(np.unique(indices)) == len(indices)
    dense = np.asarray(tf.convert_to_tensor(out))
    np.testing.assert_allclose(dense, expected, rtol=rtol, atol=0)


@sparse
def test_sparse_global_norm_is_the_dense_norm():
    slices, dense = sparse_example()
    # The squares and their sum are exact (integers): one rounding, the sqrt.
    np.testing.assert_allclose(
        float(kc.ops.global_norm([slices])), np_norm(dense), rtol=HALF_ULP
    )
    assert np_norm(dense) == pytest.approx(math.sqrt(10))


@sparse
def test_sparse_clip_by_value_clips_the_dense_elements():
    slices, dense = sparse_example()
    (out,) = kc.ops.clip_by_value([slices], 1.5)
    # The dense gradient's 2s are clipped to 1.5: exact in float32.
    assert_sparse_matches(out, np.clip(dense, -1.5, 1.5), rtol=0)


@sparse
def test_sparse_clip_by_norm_uses_the_dense_norm():
    slices, dense = sparse_example()
    (out,) = kc.ops.clip_by_norm([slices], 1.0)
    # Roundings: sqrt, divide, multiply.
    assert_sparse_matches(out, dense / np_norm(dense), rtol=3 * HALF_ULP)


@sparse
def test_sparse_clip_by_global_norm_uses_the_dense_norm():
    slices, dense = sparse_example()
    other = np.array([2.0, 0.0], "float32")
    clipped, norm = kc.ops.clip_by_global_norm([None, slices, other], 1.0)
    total = math.sqrt(np_norm(dense) ** 2 + np_norm(other) ** 2)
    # The squares and their sums are exact: the sqrt rounds once.
    np.testing.assert_allclose(float(norm), total, rtol=HALF_ULP)
    assert clipped[0] is None
    # Roundings: sqrt, divide, multiply.
    assert_sparse_matches(clipped[1], dense / total, rtol=3 * HALF_ULP)
    np.testing.assert_allclose(
        np.asarray(clipped[2]), other / total, rtol=3 * HALF_ULP, atol=0
    )


@sparse
@pytest.mark.parametrize("axis", [None, -1], ids=["columns", "rows"])
def test_sparse_unitwise_norm_is_the_dense_one(axis):
    slices, dense = sparse_example()
    reduce = 0 if axis is None else 1
    expected = np.sqrt(np.sum(dense * dense, axis=reduce, keepdims=True))
    out = np.asarray(kc.ops.unitwise_norm(slices, axis=axis))
    assert out.shape == expected.shape
    # The squares and their sums are exact (integers): one rounding, the sqrt.
    np.testing.assert_allclose(out, expected, rtol=HALF_ULP, atol=0)


# (axis, clip_factor): the factors clip one unit of the dense gradient and
# leave the other alone (columns: 2.236 against 2.19 and 2.57; rows: 1.414
# against 1.26 and 2.83 against 3.22).
AGC_SPARSE = [(None, 0.2), (-1, 0.35)]


@sparse
@pytest.mark.parametrize("axis, factor", AGC_SPARSE, ids=["columns", "rows"])
def test_sparse_adaptive_grad_clip_uses_the_dense_units(axis, factor):
    slices, dense = sparse_example()
    params = sparse_params()
    reduce = 0 if axis is None else 1
    g_units = np.sqrt(np.sum(dense * dense, axis=reduce, keepdims=True))
    p = params.astype(np.float64)
    p_units = np.sqrt(np.sum(p * p, axis=reduce, keepdims=True))
    max_norm = factor * np.maximum(p_units, 1e-3)
    over = g_units > max_norm
    assert over.any() and not over[g_units > 0].all()
    scale = np.where(over, max_norm / np.where(g_units > 0, g_units, 1), 1.0)
    (out,) = kc.ops.adaptive_grad_clip([slices], [params], factor, axis=axis)
    # Roundings: the factor to float32, two sqrts, the product, the divide
    # and the multiply.
    assert_sparse_matches(out, dense * scale, rtol=6 * HALF_ULP)


def test_norms_accumulate_in_float32():
    g = np.full((1000,), 300.0, "float16")  # float16 sum of squares overflows
    norm = float(kc.ops.global_norm([g]))
    np.testing.assert_allclose(norm, 300.0 * math.sqrt(1000), rtol=1e-4)
    clipped, _ = kc.ops.clip_by_global_norm([g], 1.0)
    out = np.asarray(clipped[0])
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    np.testing.assert_allclose(np_norm(out), 1.0, rtol=1e-2)


def test_nonfinite_norms_do_not_divide():
    scale = kc_ops.clip_scale(keras.ops.array([0.0, np.inf, np.nan, 0.5, 2.0]), 1.0)
    np.testing.assert_array_equal(np.asarray(scale)[[0, 2, 3]], [1.0, 1.0, 1.0])
    assert float(np.asarray(scale)[1]) == 0.0
    assert float(np.asarray(scale)[4]) == 0.5


# Serialization and strings.

ALL = [
    kc.ValueClip(0.5),
    kc.NormClip(2.0),
    kc.GlobalNormClip(3.0),
    kc.AdaptiveGradClip(0.02, epsilon=1e-4, axis=(0, 1), exclude=["head"]),
    kc.GlobalNormClip(keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)),
]


@pytest.mark.parametrize("clipper", ALL, ids=repr)
def test_round_trip(clipper):
    config = clipper.get_config()
    again = type(clipper).from_config(config)
    assert again.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(clipper)
    )
    assert type(revived) is type(clipper)
    assert revived.get_config() == config


@pytest.mark.parametrize(
    "name, cls",
    [("value", kc.ValueClip), ("norm", kc.NormClip),
     ("global_norm", kc.GlobalNormClip), ("agc", kc.AdaptiveGradClip)],
)
def test_strings_and_dicts(name, cls):
    assert type(clippers.get(name)) is cls
    assert clippers.get(name).get_config() == cls().get_config()
    first_arg = next(iter(cls().get_config()))
    from_dict = clippers.get({"class_name": name, "config": {first_arg: 0.25}})
    assert type(from_dict) is cls and getattr(from_dict, first_arg) == 0.25


@pytest.mark.parametrize(
    "make, err, msg",
    [
        (lambda: kc.GlobalNormClip(0), ValueError, "Received: max_norm=0"),
        (lambda: kc.NormClip(-1.0), ValueError, "Received: max_norm=-1.0"),
        (lambda: kc.ValueClip(float("nan")), ValueError, "Received: max_value=nan"),
        (lambda: kc.GlobalNormClip(float("inf")), ValueError, "Received: max_norm=inf"),
        (lambda: kc.GlobalNormClip(True), TypeError, "Received: max_norm=True"),
        (lambda: kc.ValueClip("1.0"), TypeError, "Received: max_value='1.0'"),
        (lambda: kc.AdaptiveGradClip(0.0), ValueError, "Received: clip_factor=0.0"),
        (lambda: kc.AdaptiveGradClip(epsilon=0), ValueError, "Received: epsilon=0"),
        (lambda: kc.AdaptiveGradClip(epsilon="x"), TypeError, "Received: epsilon='x'"),
        (lambda: kc.AdaptiveGradClip(axis="0"), TypeError, "Received: axis='0'"),
        (lambda: kc.AdaptiveGradClip(exclude=3), TypeError, "Received: exclude=3"),
        (lambda: kc.AdaptiveGradClip(exclude=["("]), ValueError, "Received: exclude=['(']"),
        (lambda: clippers.get("bogus"), ValueError, "Received: clipper='bogus'"),
        (lambda: clippers.get(3.0), TypeError, "Received: clipper=3.0"),
    ],
)
def test_bad_arguments(make, err, msg):
    with pytest.raises(err) as info:
        make()
    assert str(info.value).endswith(msg)


def test_a_subclass_of_a_clipper_clips_as_its_parent():
    # Its `Threshold` attributes are found on the parent class.
    class Logged(kc.NormClip):
        pass

    grads = [np.array([3.0, 4.0], "float32")]
    state = {"threshold": np.asarray(1.0, "float32")}
    (out,), _, info = Logged(1.0).update(grads, state)
    # Two float32 roundings: the factor 1 / 5, then the product.
    np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=2 * 2**-24)
    assert bool(info["clipped"])


@pytest.mark.parametrize("size", [12, 70_000])
def test_value_clip_sees_one_element_one_ulp_above_the_bound(size):
    # "clipped" comes from the sum of |g| - c over the moved elements: one
    # element a unit in the last place above c among many below still counts.
    c = np.float32(0.3)
    g = np.full(size, 0.1, "float32")
    grads = [g, -g]
    state = {"threshold": np.asarray(c)}
    _, _, info = kc.ValueClip(c).update(grads, state)
    assert not bool(info["clipped"])
    grads[1][size // 2] = -np.nextafter(c, np.float32(1))
    _, _, info = kc.ValueClip(c).update(grads, state)
    assert bool(info["clipped"])


def test_threshold_setter_checks_too():
    clip = kc.GlobalNormClip(1.0)
    with pytest.raises(ValueError, match="Received: max_norm=-2"):
        clip.max_norm = -2
    assert clip.max_norm == 1.0


@pytest.mark.parametrize("run_as", ["eager", "compiled"])
def test_tensor_sums_of_many_sizes_match_numpy(run_as):
    # Small tensors of one size and dtype are summed as the rows of one
    # matrix, in groups; the rows must come back in the tensors' order. Four
    # tensors of 12 elements among others, one large (its own product), one
    # empty, a float16 one of 12 elements (a group of its own).
    shapes = [(3, 4), (5,), (12,), (70_001,), (4, 3), (0,), (5,), (2, 2, 3), (1,), ()]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads.insert(3, rng.standard_normal((12,)).astype("float16"))
    positive = lambda g: keras.ops.cast(g > 0, g.dtype)  # noqa: E731
    sums = kc_ops.tensor_sums if run_as == "eager" else steps.compiled(
        lambda gs: kc_ops.tensor_sums(gs, [positive])
    )
    out = np.asarray(sums(grads, [positive]) if run_as == "eager" else sums(grads))
    for i, g in enumerate(grads):
        g64 = g.astype("float64")
        # float32 sums of n non-negative terms: relative error <= n * 2^-24.
        bound = max(g.size, 1) * np.finfo(np.float32).eps / 2
        np.testing.assert_allclose(out[i, 0], np.sum(g64 * g64), rtol=bound, atol=0)
        assert out[i, 1] == np.sum(g > 0)


@pytest.mark.parametrize("run_as", ["eager", "compiled"])
def test_entries_are_exact_and_keep_other_entries_out(run_as):
    # A non-finite entry stays in its own place: the masked sums add zeros,
    # never 0 * inf or NaN.
    v = np.array([0.5, np.inf, -3.25, np.nan, 1e-30, -0.0, 7.0], "float32")
    take = (lambda x: kc_ops.entries(x)) if run_as == "eager" else steps.compiled(
        lambda x: kc_ops.entries(x)
    )
    out = np.array([float(x) for x in take(v)], "float32")
    np.testing.assert_array_equal(out, v)  # (NaN == NaN here; exact elsewhere)


@pytest.mark.tensorflow(reason="the graph's ops are TensorFlow's")
@pytest.mark.jax(reason="the jaxpr's primitives are JAX's")
def test_per_tensor_factors_reach_the_tensors_without_slices():
    # The seam `kc_ops.entries`: XLA fuses a slice, with its index, into each
    # kernel that reads it, so same-shaped tensors scaled by their own entry
    # would get kernels of their own, each compiled separately (NormClip's
    # and AdaGC's first call). Under XLA every entry is a masked sum instead.
    grads = [np.ones((4, 4), "float32") for _ in range(5)]
    factors = np.linspace(0.1, 0.5, 5).astype("float32")
    fn = lambda f: kc_ops.scale(grads, f)  # noqa: E731
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def kinds(jit_compile):
            f = tf.function(fn, jit_compile=jit_compile)
            graph = f.get_concrete_function(factors).graph
            return {op.type for op in graph.get_operations()}

        assert not kinds(True) & {"StridedSlice", "Slice", "Unpack", "Split", "GatherV2"}
        assert "Sum" in kinds(True)
        # Without XLA each operation is a kernel: one slice an entry.
        assert "Unpack" in kinds(False)
    else:
        import jax

        jaxpr = jax.make_jaxpr(fn)(factors)
        kinds = {e.primitive.name for e in jaxpr.jaxpr.eqns}
        assert not kinds & {"slice", "dynamic_slice", "gather", "squeeze", "split"}
        assert "reduce_sum" in kinds
    out = fn(factors)
    for g, f, o in zip(grads, factors, out):
        np.testing.assert_array_equal(np.asarray(o), g * f)


@pytest.mark.tensorflow(reason="the graph's ops are TensorFlow's")
def test_agc_takes_one_square_root_a_tensor_of_units():
    # The seam `kc_ops._agc_factors`: TensorFlow lowers each `Sqrt` of a step
    # XLA compiles on its own, about 5 ms each at its first call. AGC takes
    # its factors in squares, one square root a tensor of units (of the
    # ratio), and the tensors that are one unit each take theirs together:
    # 5 kernels and 5 biases, 5 + 1, and one for the clipped norm.
    import tensorflow as tf

    rng = np.random.default_rng(3)
    shapes = [(4, 3), (3,)] * 5
    grads = [rng.standard_normal(s).astype("float32") for s in shapes]
    params = [rng.standard_normal(s).astype("float32") for s in shapes]
    clipper = kc.AdaptiveGradClip(0.05)
    state = {k: np.asarray(v) for k, v in clipper.init_state(params).items()}

    def clip(gs, ps):
        out, _, info = clipper.update(gs, state, ps)
        return out, info["clipped_norm"]

    graph = tf.function(clip, jit_compile=True).get_concrete_function(grads, params).graph
    assert [op.type for op in graph.get_operations()].count("Sqrt") == 5 + 1 + 1
    # (Their values: `test_agc_on_many_tensors_of_one_shape_matches_numpy`.)


@pytest.mark.parametrize("shape", [(512, 256), (3, 3, 64, 128), (70_001,)])
def test_large_tensor_norms_match_numpy(shape):
    # Large tensors take the matrix-vector path of `_sq_norm`; odd sizes not.
    g = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.testing.assert_allclose(float(kc.ops.global_norm([g])), np_norm(g), rtol=1e-6)
    clipped = np.asarray(kc.ops.clip_by_norm([g], 1.0)[0])
    np.testing.assert_allclose(np_norm(clipped), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(512, 256), (257, 256), (70_001,), (7,)])
@pytest.mark.parametrize("mode", ["eager", *([steps.XLA] if steps.XLA else [])])
def test_value_clip_statistics_match_numpy(shape, mode):
    # The optimizer takes ValueClip's statistics in the norms' pass (one
    # product over the gradient, for large tensors: rows of 1024, or of 256
    # for (257, 256); a reduce for an odd size): they must be those of the
    # clipped gradient. One element just above the bound moves the sum
    # of squares by less than its rounding: the step still counts as clipped.
    g = np.random.default_rng(1).uniform(-0.5, 0.5, shape).astype("float32")
    g.flat[3] = np.nextafter(np.float32(1.0), np.float32(2.0))
    opt = kc.ClippedSGD(0.0, clipper=kc.ValueClip(1.0))
    w = keras.Variable(np.zeros(shape, "float32"))
    opt.build([w])
    steps.compiled_apply(opt, [w], mode)([g])
    stats = opt.gradient_stats()
    assert stats["clipped_steps"] == 1
    np.testing.assert_allclose(stats["grad_norm"], np_norm(g), rtol=1e-6)
    np.testing.assert_allclose(
        stats["clipped_grad_norm"], np_norm(np.clip(g, -1, 1)), rtol=1e-6
    )
    opt.apply([np.clip(g, -1, 1)], [w])
    assert opt.gradient_stats()["clipped_steps"] == 1
