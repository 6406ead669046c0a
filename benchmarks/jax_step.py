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
from run import ADAM_AGAIN, FLOOR, _optimizer, _summary, _timed_rounds

SIZE, COUNT = 262_144, 64
# row -> the configuration's name in `optax_ref.CLIPPERS`
OPTAX = {
    "optax.adam": "adam",
    "optax.chain(clip_by_global_norm(1.0), adam)": "clip_by_global_norm(1.0)",
    "optax.chain(clip(1.0), adam)": "clip(1.0)",
    "optax.chain(adaptive_grad_clip(0.01), adam)": "adaptive_grad_clip(0.01)",
}


def _keras_instance(name, grads, seed, norm_first=False):
    """One optimizer with values of its own: a callable that runs one step and waits.

    With `norm_first`, every gradient waits for the global norm (a select on
    a predicate that is always false, `n != n and n == n`), then the
    optimizer updates: the least a step that may skip does (the floor).
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
    state = ([v.value for v in variables], [v.value for v in optimizer.variables])

    def apply(state, grads):
        trainable, optimizer_values = state
        if norm_first:
            import jax.numpy as jnp

            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
            never = jnp.logical_and(norm != norm, norm == norm)
            grads = [jnp.where(never, -g, g) for g in grads]
        return optimizer.stateless_apply(optimizer_values, grads, trainable)

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
    steps[FLOOR] = [
        _keras_instance("Adam", grads, 100 * i + 40, norm_first=True)
        for i in range(instances)
    ]
    for j, (row, name) in enumerate(OPTAX.items()):
        steps[row] = [
            optax_ref._instance(name, True, grads, 100 * i + 50 + j)
            for i in range(instances)
        ]
    return _summary(_timed_rounds(steps, rounds, calls), "Adam")
