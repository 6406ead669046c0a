"""One optimizer step, compiled the ways training compiles it, on any backend.

The tests that check what `optimizer.apply` does run it as the backend's
training loop would: on TensorFlow in a `tf.function`, with XLA ("xla") or
without ("graph"); on JAX jitted as `fit` jits it ("jit": `jax.jit` of
`optimizer.stateless_apply`, the values it returns assigned back) or eagerly
("eager"); on torch eagerly ("eager"), as `fit` runs it. "eager" is also
accepted on TensorFlow, for the tests that compare it with a compiled step.

    step = compiled_apply(optimizer, variables, "jit")
    step(grads)       # optimizer.apply(grads, variables), compiled
    step.traces       # how many times the step's Python ran: 1 once compiled

TensorFlow is imported only on TensorFlow's paths, JAX only on JAX's.
"""

import keras
from keras import ops

BACKEND = keras.backend.backend()

# The one-device paths each backend trains on, and those among them that
# trace the step once and reuse it.
PATHS = {
    "tensorflow": ("xla", "graph"),
    "jax": ("jit", "eager"),
    "torch": ("eager",),
}[BACKEND]
COMPILED = tuple(p for p in PATHS if p != "eager")
# The backend's XLA-compiled path (none on torch: `fit` runs it eagerly).
XLA = {"tensorflow": "xla", "jax": "jit"}.get(BACKEND)
# `jit_compile=` for `model.compile`: torch's `True` is `torch.compile`, not
# the eager loop its `fit` runs by default.
FIT_JIT_COMPILE = BACKEND != "torch"


class Step:
    """`optimizer.apply(grads, variables)` on `mode`'s path; see the module."""

    def __init__(self, optimizer, variables, mode):
        if mode not in PATHS + ("eager",):
            raise ValueError(f"No path {mode!r} on {BACKEND}; it has {PATHS}.")
        self.optimizer, self.variables, self.mode = optimizer, list(variables), mode
        self.traces = 0
        if mode in ("xla", "graph"):
            import tensorflow as tf

            self._run = tf.function(self._apply, jit_compile=mode == "xla")
        elif mode == "jit":
            import jax

            jitted = jax.jit(self._stateless)
            self._run = lambda grads: self._assign(jitted(*self._values(), grads))
            optimizer.build(self.variables)  # (its variables go in and out)
        else:
            self._run = self._apply

    def _apply(self, grads):
        self.traces += 1
        self.optimizer.apply(grads, self.variables)

    # JAX: the optimizer's and the trained variables' values in and out, as
    # Keras's JAX trainer passes them.

    def _values(self):
        return (
            [v.value for v in self.optimizer.variables],
            [v.value for v in self.variables],
        )

    def _stateless(self, optimizer_values, trainable_values, grads):
        self.traces += 1
        return self.optimizer.stateless_apply(optimizer_values, grads, trainable_values)

    def _assign(self, values):
        trainable_values, optimizer_values = values
        for v, value in zip(self.variables, trainable_values):
            v.assign(value)
        for v, value in zip(self.optimizer.variables, optimizer_values):
            v.assign(value)

    def __call__(self, grads):
        self._run([ops.convert_to_tensor(g) for g in grads])


def compiled_apply(optimizer, variables, mode):
    """A `Step` applying gradients to `variables` (the optimizer built on them)."""
    return Step(optimizer, variables, mode)


def compiled(fn):
    """`fn` of tensors, XLA-compiled where the backend compiles (torch: as is)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn
