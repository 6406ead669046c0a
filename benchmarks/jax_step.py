"""Part (a) of `run.py` on JAX: the optimizer step alone, as Keras-JAX's `fit` runs it.

`optimizer.apply` is stateful on JAX; Keras's `fit` instead runs
`optimizer.stateless_apply(optimizer_variables, grads, trainable_values)`
inside one `jax.jit` with its state (trainable and optimizer values among
it) donated (`keras/src/backend/jax/trainer.py`: `donate_argnums=0`, the
state, not the batch). So each configuration here is that call, jitted, the
optimizer's and the trainable values passed in, donated, and passed back
out; optax runs in the same process and table, its parameters and state
donated too (`optax_ref._instance`). Same tensors (64 x 262,144 float32)
and protocol as (a) on TensorFlow (`run._timed_rounds`); ratios to
Keras-JAX's Adam. Run through `run.py --backend jax`, not on its own.
"""

import numpy as np
from run import ADAM_AGAIN, FLOOR, FLOOR_AGC, FLOOR_VALUE, _optimizer, _summary, _timed_rounds

SIZE, COUNT = 262_144, 64
# row -> the configuration's name in `optax_ref.CLIPPERS`
OPTAX = {
    "optax.adam": "adam",
    "optax.chain(clip_by_global_norm(1.0), adam)": "clip_by_global_norm(1.0)",
    "optax.chain(clip(1.0), adam)": "clip(1.0)",
    "optax.chain(adaptive_grad_clip(0.01), adam)": "adaptive_grad_clip(0.01)",
}


def _least_sums(kind, grads, weights, threshold):
    """What a step of `kind` must read before its first write: one float32
    scalar per gradient, or `None`.

    "skip": each gradient's sum of squares (the global norm). "value": that
    and `ValueClip`'s two statistics (the clipped squares, how far clipping
    moves the elements) against `threshold`, a value only known at run
    time (thresholds live in variables), in the fastest form measured
    here: one variadic reduction per tensor (as three sums, XLA's CPU
    backend ran them as one slow loop: 3.2 of Adam's step). "agc": the
    norm, and each weight's sum of squares.
    """
    import jax.numpy as jnp
    from jax import lax

    if kind is None:
        return None
    if kind == "value":
        def three(g):
            c = threshold
            terms = (g * g, jnp.square(jnp.clip(g, -c, c)), jnp.maximum(jnp.abs(g) - c, 0))
            return sum(lax.reduce(terms, (0.0,) * 3, lambda x, y: tuple(
                a + b for a, b in zip(x, y)), (0,)))
        return [three(g) for g in grads]
    norm = sum(jnp.sum(g * g) for g in grads)
    if kind == "skip":
        return [norm] * len(grads)
    return [norm + jnp.sum(w * w) for w in weights]


def _keras_instance(name, grads, seed, least=None):
    """One optimizer with values of its own: a callable that runs one step and waits.

    With `least` ("skip", "value", "agc"; see `_least_sums`), each gradient
    waits for what a step of that kind reads first (through a select on a
    predicate that is always false, `s != s and s == s`), then the
    optimizer updates: the least program of that kind (the floor, with
    "skip").
    """
    import jax
    import keras

    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.standard_normal(SIZE).astype("float32") * 0.01)
        for _ in range(COUNT)
    ]
    optimizer = _optimizer(name)
    optimizer.build(variables)
    threshold = np.float32(1.0)  # passed in, so not a constant to XLA
    state = ([v.value for v in variables], [v.value for v in optimizer.variables], threshold)

    def apply(state, grads):
        import jax.numpy as jnp

        trainable, optimizer_values, threshold = state
        sums = _least_sums(least, grads, trainable, threshold)
        if sums is not None:
            never = [jnp.logical_and(s != s, s == s) for s in sums]
            grads = [jnp.where(n, -g, g) for n, g in zip(never, grads)]
        return (*optimizer.stateless_apply(optimizer_values, grads, trainable), threshold)

    # The state goes out in the order it came in, as in Keras's `train_step`:
    # JAX hands each output the first donated input buffer of its shape, and
    # `stateless_apply`'s own order (optimizer values in first, trainable
    # values out first) would make XLA copy every buffer (Adam 4-5x slower).
    step = jax.jit(apply, donate_argnums=0)

    def call():
        nonlocal state
        state = step(state, grads)
        jax.block_until_ready(state)

    return call


def part_a_jax(names, rounds, instances=3, calls=3):
    """Keras-JAX's optimizers (`names`, Adam first), Adam again, and optax."""
    import jax.numpy as jnp
    import optax_ref

    rng = np.random.default_rng(1)
    grads = [jnp.asarray(rng.standard_normal(SIZE).astype("float32")) for _ in range(COUNT)]
    steps = {}
    for j, name in enumerate([*names, ADAM_AGAIN]):
        config = "Adam" if name == ADAM_AGAIN else name
        steps[name] = [
            _keras_instance(config, grads, 100 * i + j) for i in range(instances)
        ]
    for j, (row, least) in enumerate(((FLOOR, "skip"), (FLOOR_VALUE, "value"),
                                      (FLOOR_AGC, "agc"))):
        steps[row] = [
            _keras_instance("Adam", grads, 100 * i + 40 + j, least=least)
            for i in range(instances)
        ]
    for j, (row, name) in enumerate(OPTAX.items()):
        steps[row] = [
            optax_ref._instance(name, True, grads, 100 * i + 60 + j)
            for i in range(instances)
        ]
    return _summary(_timed_rounds(steps, rounds, calls), "Adam")
