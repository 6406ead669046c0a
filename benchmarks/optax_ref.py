"""The reference the issue names: optax on JAX, benchmark (a)'s step and protocol.

    pip install jax optax && python benchmarks/optax_ref.py [--rounds 120] [--json out.json]

64 tensors of 262,144 float32 (16.8M parameters); each configuration is an
`optax` transformation chained before `optax.adam(1e-3)` and applied with
`optax.apply_updates` in one `jax.jit`. Each runs twice: with the parameters
and the optimizer state donated to the step (updated in place, as in a
training loop) and without (every step allocates new buffers); each ratio is
to `optax.adam` run the same way. As in `run.py` (a), every round times every
configuration in a fresh random order, as `--instances` copies with buffers
of their own, 3 calls each, and takes the mean over the copies; each figure
is the median over rounds of the ratio to Adam in that round, with a 95%
bootstrap interval for that median. Needs neither TensorFlow nor Keras.
Not part of the test run.
"""

import argparse
import json
import sys

import numpy as np
from run import (  # (this script's directory is on the path)
    _summary,
    _table,
    _timed_rounds,
)

SHAPES = [262_144] * 64
# name -> the transformation chained before Adam (None: Adam alone)
CLIPPERS = {
    "adam": None,
    "clip_by_global_norm(1.0)": lambda optax: optax.clip_by_global_norm(1.0),
    "clip(1.0)": lambda optax: optax.clip(1.0),
    "adaptive_grad_clip(0.01)": lambda optax: optax.adaptive_grad_clip(0.01),
    "adam again": None,
}
CONFIGS = list(CLIPPERS)


def _transform(name):
    import optax

    adam = optax.adam(1e-3)
    clipper = CLIPPERS[name]
    return adam if clipper is None else optax.chain(clipper(optax), adam)


def _instance(name, donate, grads, seed):
    """One copy of a configuration: a callable that runs one step and waits."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = _transform(name)
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(n).astype("float32") * 0.01) for n in SHAPES]
    buffers = {"params": params, "state": tx.init(params)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ())

    def call():
        buffers["params"], buffers["state"] = compiled(
            buffers["params"], buffers["state"], grads
        )
        jax.block_until_ready(buffers["params"])

    return call


def run(rounds, instances=3, calls=3):
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    grads = [jnp.asarray(rng.standard_normal(n).astype("float32")) for n in SHAPES]
    steps = {}
    for mode, donate in (("donated", True), ("not donated", False)):
        for j, name in enumerate(CONFIGS):
            steps[f"{name}, {mode}"] = [
                _instance(name, donate, grads, 100 * i + j) for i in range(instances)
            ]
    times = _timed_rounds(steps, rounds, calls)
    out = {}
    for mode in ("donated", "not donated"):
        out.update(_summary(
            {name: ts for name, ts in times.items() if name.endswith(f", {mode}")},
            f"adam, {mode}",
        ))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=120,
                        help="interleaved rounds (at least 5)")
    parser.add_argument("--instances", type=int, default=3,
                        help="copies per configuration, each with buffers of its own")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5. Received: {args.rounds}")
    if args.instances < 1:
        parser.error(f"--instances must be at least 1. Received: {args.instances}")
    try:
        import jax
        import optax
    except ImportError as error:
        parser.error(f"needs jax and optax (pip install jax optax). Received: {error}")
    print(f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}")
    results = run(args.rounds, instances=args.instances)
    _table("optax step, 16.8M float32 params, jit; ratio to optax.adam run the same way",
           results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "optax": optax.__version__,
                       "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
