"""The structure that makes the compiled step fast, pinned without timing it.

Timings live in benchmarks/ (run on purpose, not in CI). These tests pin what
the speed rests on: the update chain survives XLA's optimizations and changes
no value, and a step allocates no gradient-sized buffer. They read what
TensorFlow compiles (XLA's optimized HLO, TensorFlow's memory statistics), and
the update chain exists only there: they run on TensorFlow. That an unclipped
step equals Keras's, bit for bit, holds on every backend.
"""

import keras
import numpy as np
import pytest

import keras_clip as kc
from keras_clip import backend

from test_correctness import CLIPPERS


HLO = pytest.mark.tensorflow(
    reason="reads XLA's optimized HLO of a tf.function (experimental_get_compiler_ir)"
)


def _entry_lines(hlo):
    lines = hlo.split("ENTRY", 1)[1].splitlines()
    return [line.strip() for line in lines[1:] if line.strip() not in ("", "}")]


@HLO
def test_chain_dependency_survives_xla():
    import tensorflow as tf

    # Without the chain, XLA schedules every variable's first fusion before
    # any second one. The chain's token must survive XLA's simplifier: with
    # two lanes, the third gradient's output depends on the first variable's
    # value, and not on the second's (that one is the other lane's).
    def step(g, w1, w2):
        chain = backend.UpdateChain()
        chain.link(w1)
        chain.link(w2)
        return chain.after_previous(g)

    fn = tf.function(step, jit_compile=True)
    g = tf.constant(np.arange(8, dtype="float32"))
    w1 = tf.Variable(np.ones(8, "float32"))
    w2 = tf.Variable(np.ones(8, "float32"))
    hlo = fn.experimental_get_compiler_ir(g, w1, w2)(stage="optimized_hlo")
    lines = _entry_lines(hlo)
    params = {
        int(line.split("parameter(")[1].split(")")[0]): line.split(" = ")[0]
        for line in lines
        if "parameter(" in line
    }
    uses = {
        i: sum(p + ")" in line or p + "," in line for line in lines)
        for i, p in params.items()
    }
    assert uses.get(0, 0) >= 1 and uses.get(1, 0) >= 1, hlo  # g, w1
    assert uses.get(2, 0) == 0, hlo  # w2


def _update_waits(clipper, size):
    """Which update fusions of a three-variable SGD step wait for another's
    output: `(waiting, waited-for)` pairs of XLA's optimized HLO."""
    import tensorflow as tf

    opt = kc.ClippedSGD(0.1, clipper=clipper)
    variables = [keras.Variable(np.full(size, i + 1.0, "float32")) for i in range(3)]
    grads = [tf.constant(np.full(size, 0.5, "float32")) for _ in range(3)]
    opt.build(variables)
    fn = tf.function(lambda gs: opt.apply(gs, variables), jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(grads)(stage="optimized_hlo")
    updates = {}
    for line in _entry_lines(hlo):
        name, _, rest = line.partition(" = ")
        if rest.startswith(f"f32[{size}]{{0}} fusion("):
            updates[name] = rest.split("), kind=")[0]
    assert len(updates) >= 3, hlo
    return [
        (name, other)
        for name, rest in updates.items()
        for other in updates
        if other != name and (other + ")" in rest or other + "," in rest)
    ], hlo


@HLO
@pytest.mark.parametrize("clipper", [None, "value", "agc"])
def test_optimizer_updates_large_variables_in_order_two_at_a_time(clipper):
    # Three large variables, plain SGD: one update fusion each. Chained in
    # two lanes, the third update reads the first one's output (in reverse
    # order: the norm pass read the last gradients last, so their updates go
    # first), and the second reads none: one update is waited for. (AGC
    # scales the third gradient in a fusion of its own, which waits too.)
    from keras_clip.backend.tensorflow import UpdateChain

    waits, hlo = _update_waits(clipper, UpdateChain.MIN_SIZE)
    assert len({other for _, other in waits}) == 1, hlo


@HLO
@pytest.mark.parametrize("clipper", [None, "value", "agc"])
def test_small_variables_are_not_ordered(clipper):
    # Under `UpdateChain.MIN_SIZE` elements no update waits for another: on
    # many small variables the waits serialized kernels whose fixed cost sets
    # their time (benchmarks/README.md, part e).
    from keras_clip.backend.tensorflow import UpdateChain

    waits, hlo = _update_waits(clipper, UpdateChain.MIN_SIZE - 1)
    assert waits == [], hlo


def _critical_path(hlo):
    """The most fusions (XLA's kernels) any one value of the step waits for."""
    depth = {}
    for line in _entry_lines(hlo):
        name, _, rest = line.partition(" = ")
        operands = rest.split("), ", 1)[0].replace("(", " ").replace(",", " ")
        before = [depth[o] for o in operands.split() if o in depth]
        depth[name] = max(before, default=0) + (" fusion(" in rest)
    return max(depth.values())


@HLO
def test_agc_waits_for_three_kernels_per_variable():
    import tensorflow as tf

    # Each variable's update waits, in its lane, for its weight's norm (the
    # partial sums, their sum, the root: 3 kernels), its scale (1) and its
    # update (2): 3 per variable over two lanes. Deriving AGC's flags from
    # the scale keeps their own kernel out of that path (it was 3.5 per
    # variable, and AGC's step 0.05 of Adam's slower).
    def path(n):
        opt = kc.ClippedAdam(1e-3, clipper=kc.AdaptiveGradClip())
        variables = [keras.Variable(np.ones(1 << 16, "float32")) for _ in range(n)]
        grads = [tf.constant(np.ones(1 << 16, "float32")) for _ in range(n)]
        opt.build(variables)
        fn = tf.function(lambda gs: opt.apply(gs, variables), jit_compile=True)
        return _critical_path(fn.experimental_get_compiler_ir(grads)(stage="optimized_hlo"))

    assert path(8) - path(4) <= 3 * 4


@pytest.mark.tensorflow(
    reason="the update chain is an XLA select under tf.function; elsewhere it is a no-op"
)
def test_chain_changes_no_bit():
    import tensorflow as tf

    values = np.array([-0.0, 0.0, 1.5, -2.0, np.nan, np.inf, -np.inf, 1e-45], "float32")
    for first in (1.0, np.nan, np.inf, -0.0):
        w = tf.Variable(np.full(3, first, "float32"))

        @tf.function(jit_compile=True)
        def step(g):
            chain = backend.UpdateChain()
            chain.link(w)
            chain.link(w)
            out = chain.after_previous(g)
            assert out is not g  # the select is there
            return out

        out = step(tf.constant(values)).numpy()
        assert out.tobytes() == values.tobytes(), (first, out)


# name -> (kwargs, bit for bit). The chained, reversed update is Keras's own
# arithmetic on the same gradient; only where LLVM fuses multiply-adds
# differently around the chain's select (Lion's momentum) does a value round
# differently, by an ulp.
OPTIMIZERS = {
    "Adam": ({}, True),
    "SGD": ({"momentum": 0.9}, True),
    "AdamW": ({"weight_decay": 0.01}, True),
    "Nadam": ({}, True),
    "RMSprop": ({"momentum": 0.5}, True),
    "Lion": ({}, False),
}


def _compiled_apply(opt, variables):
    """`opt.apply` on `variables`, compiled by XLA on TensorFlow (as
    `model.fit` would), eager elsewhere."""
    apply = lambda gs: opt.apply(gs, variables)  # noqa: E731
    if keras.backend.backend() != "tensorflow":
        return apply
    import tensorflow as tf

    return tf.function(apply, jit_compile=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unclipped_step_equals_keras(name):
    rng = np.random.default_rng(0)
    shapes = [(5, 7), (7,), (3, 3, 2, 4), ()]
    init = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads = [
        [rng.standard_normal(s).astype("float32") for s in shapes] for _ in range(3)
    ]
    grads[1][0][0, 0] = -0.0
    results = []
    keras_cls = getattr(keras.optimizers, name)
    if keras.backend.backend() == "torch":
        # Keras on torch swaps in a fused (`torch._foreach_*`) update for the
        # exact built-in class only, which rounds differently; any subclass,
        # keras-clip's included, runs the rule's own `update_step`.
        keras_cls = type(name, (keras_cls,), {})
    for cls in (keras_cls, getattr(kc, f"Clipped{name}")):
        kwargs = dict(OPTIMIZERS[name][0])
        if cls is not keras_cls:
            # (With "skip", a masked slot update may round 1 ulp apart
            # where LLVM fused a multiply-add: not what this test is about.)
            kwargs["nonfinite"] = "propagate"
        opt = cls(learning_rate=0.01, **kwargs)
        variables = [keras.Variable(x) for x in init]
        fn = _compiled_apply(opt, variables)
        for gs in grads:
            fn([keras.ops.convert_to_tensor(g) for g in gs])
        numpy = keras.ops.convert_to_numpy
        results.append(([numpy(v) for v in variables], [numpy(v) for v in opt.variables]))
    (w_keras, s_keras), (w_ours, s_ours) = results
    # keras-clip builds Keras's state first, then its own.
    s_ours = s_ours[: len(s_keras)]
    for a, b in zip(w_keras + s_keras, w_ours + s_ours):
        if OPTIMIZERS[name][1]:
            assert a.tobytes() == b.tobytes()
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.tensorflow(
    reason="TensorFlow's memory statistics (tf.config.experimental.get_memory_info)"
)
@pytest.mark.parametrize("name", CLIPPERS)
def test_step_allocates_no_gradient_sized_buffer(name):
    import tensorflow as tf

    # 8 x 1 MB of gradients: a copy of even one of them would show. The step
    # updates weights and slots in place and keeps only scalars besides.
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.standard_normal(262_144).astype("float32") * 0.01)
        for _ in range(8)
    ]
    grads = [tf.constant(rng.standard_normal(262_144).astype("float32")) for _ in range(8)]
    opt = kc.ClippedAdam(1e-3, clipper=CLIPPERS[name]())
    opt.build(variables)
    fn = tf.function(lambda: opt.apply(grads, variables), jit_compile=True)
    peaks = []
    for _ in range(3):
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        fn()
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
    # The first call compiles: TensorFlow once folded `zeros_like(g)` into
    # constants twice the size of all the gradients there. (It may also copy
    # a few variables that still share a buffer: hence the looser bound.)
    assert peaks[0] < 8 * 2**20, peaks
    assert max(peaks[1:]) < 2**19, peaks  # under half of one gradient


@HLO
def test_value_clip_takes_its_statistics_in_the_norms_pass():
    import tensorflow as tf

    # ValueClip's clipped sum of squares and its count of moved elements come
    # from the product that takes the norms: one dot per gradient, as many as
    # global-norm clipping has (a sum of its own would be another pass).
    def dots(clipper):
        opt = kc.ClippedAdam(1e-3, clipper=clipper)
        variables = [keras.Variable(np.ones(1 << 16, "float32")) for _ in range(2)]
        grads = [tf.constant(np.full(1 << 16, 2.0, "float32")) for _ in range(2)]
        opt.build(variables)
        fn = tf.function(lambda gs: opt.apply(gs, variables), jit_compile=True)
        hlo = fn.experimental_get_compiler_ir(grads)(stage="optimized_hlo")
        return sum(" dot(" in line for line in hlo.splitlines())

    assert dots(kc.ValueClip(1.0)) == dots(kc.GlobalNormClip(1.0)) == 2


@pytest.mark.tensorflow(reason="counts TensorFlow's variable reads in the step's graph")
@pytest.mark.parametrize("clipper", [kc.ValueClip(1.0), kc.AdaptiveGradClip()])
def test_the_step_reads_the_clipper_state_once(clipper):
    import tensorflow as tf

    # A rule uses its threshold once per gradient; each use of a variable is
    # a read of its own on TensorFlow (without XLA, an operation each).
    opt = kc.ClippedAdam(1e-3, clipper=clipper)
    variables = [keras.Variable(np.ones((3, 2), "float32")) for _ in range(6)]
    opt.build(variables)
    grads = [tf.constant(np.ones((3, 2), "float32"))] * 6
    graph = tf.function(lambda gs: opt.apply(gs, variables)).get_concrete_function(grads).graph
    handle = opt._clip_state["threshold"].value.handle
    reads = [
        op for op in graph.get_operations()
        if op.type == "ReadVariableOp" and op.inputs[0] is graph.capture(handle)
    ]
    assert len(reads) == 1, len(reads)


@pytest.mark.tensorflow(
    reason="on TensorFlow each eager read or assignment is a call of its own; "
    "elsewhere a read is a plain host copy"
)
def test_statistics_are_read_and_the_window_reset_in_one_compiled_call(monkeypatch):
    # `GradientMonitor` reads every statistic and resets the window after
    # each batch: one traced function (reads, then assignments), traced once
    # and called as its trace.
    # Were it retraced, or were a field read or reset eagerly, the patched
    # methods below would run.
    opt = kc.ClippedSGD(0.1, global_clipnorm=1.0)
    w = keras.Variable(np.ones(3, "float32"))
    opt.build([w])
    opt.apply([np.full(3, 2.0, "float32")], [w])
    first = opt.gradient_stats(reset_window=True)
    assert first["window_steps"] == 1 and first["iterations"] == 1

    def eager(*args, **kwargs):
        raise AssertionError("an eager read or assignment")

    monkeypatch.setattr(keras.Variable, "assign", eager)
    monkeypatch.setattr(keras.ops, "convert_to_numpy", eager)
    monkeypatch.setattr(keras.Variable, "numpy", eager)
    # Nor is the `tf.function` called: its trace is (see `backend.reader`).
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    monkeypatch.setattr(polymorphic_function.Function, "__call__", eager)
    for _ in range(3):
        again = opt.gradient_stats(reset_window=True)
    assert again["window_steps"] == 0 and again["steps"] == 1
    np.testing.assert_allclose(again["grad_norm"], np.sqrt(12.0), rtol=1e-6)



@pytest.mark.tensorflow(
    reason="only Keras's TensorFlow trainer builds the optimizer inside the "
    "first trace of its step (the others build it before)"
)
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("clipper", [None, "autoclip", "adagc", "schedule_free"])
def test_the_first_fit_traces_the_step_once(monkeypatch, clipper, jit_compile):
    # A `tf.function` that creates variables in its first trace is traced a
    # second time; Keras builds its optimizer in that trace. Built outside
    # it, the variables start where a build before `fit` starts them (the
    # clippers here start at inf; `ScheduleFreeAdamW`'s build copies the
    # weights), and training follows the same path.
    if clipper == "schedule_free" and not hasattr(kc, "ClippedScheduleFreeAdamW"):
        pytest.skip("keras.optimizers.ScheduleFreeAdamW came with Keras 3.14")
    make = {
        None: lambda: kc.ClippedAdam(0.1),
        "autoclip": lambda: kc.ClippedAdam(0.1, clipper=kc.AutoClip(history_size=4)),
        "adagc": lambda: kc.ClippedAdam(0.1, clipper=kc.AdaGC()),
        "schedule_free": lambda: kc.ClippedScheduleFreeAdamW(0.1, global_clipnorm=1.0),
    }[clipper]
    x = np.random.default_rng(0).standard_normal((12, 3)).astype("float32")
    y = np.random.default_rng(1).standard_normal((12, 1)).astype("float32")

    def fit(build_first):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        opt = make()
        model.compile(opt, "mse", jit_compile=jit_compile)
        if build_first:
            opt.build(model.trainable_variables)
        traces = []
        step = model.train_step
        monkeypatch.setattr(model, "train_step", lambda data: traces.append(1) or step(data))
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        return len(traces), model, opt

    traces, model, opt = fit(build_first=False)
    assert traces == 1
    reference_traces, reference, reference_opt = fit(build_first=True)
    assert reference_traces == 1
    assert opt.gradient_stats()["steps"] == 3
    for a, b in zip(model.weights + opt.variables, reference.weights + reference_opt.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
