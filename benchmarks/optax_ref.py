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
import time

import numpy as np

from run import _interval  # (this script's directory is on the path)

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


def _instance(name, donate, seed):
    import jax
    import jax.numpy as jnp
    import optax

    tx = _transform(name)
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(n).astype("float32") * 0.01) for n in SHAPES]

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return {"params": params, "state": tx.init(params), "step": compiled}


def _call(inst, grads, calls):
    import jax

    times = []
    for _ in range(calls):
        start = time.perf_counter()
        inst["params"], inst["state"] = inst["step"](inst["params"], inst["state"], grads)
        jax.block_until_ready(inst["params"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(rounds, instances=3, calls=3):
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    grads = [jnp.asarray(rng.standard_normal(n).astype("float32")) for n in SHAPES]
    keys = [(name, donate) for donate in (True, False) for name in CONFIGS]
    insts = {
        key: [_instance(key[0], key[1], 100 * i + j) for i in range(instances)]
        for j, key in enumerate(keys)
    }
    for group in insts.values():
        for inst in group:
            _call(inst, grads, 3)  # compile and warm up
    times = {key: [] for key in keys}
    order = list(keys)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            times[key].append(np.mean([_call(inst, grads, calls) for inst in insts[key]]))
    out = {}
    for name, donate in keys:
        ratios = np.array(times[name, donate]) / np.array(times["adam", donate])
        lo, hi = _interval(ratios)
        out[f"{name}, {'donated' if donate else 'not donated'}"] = {
            "ms": float(np.median(times[name, donate]) * 1e3),
            "ratio": float(np.median(ratios)), "lo": lo, "hi": hi,
            "min": float(ratios.min()), "max": float(ratios.max()),
        }
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
    print("\noptax step, 16.8M float32 params, jit; ratio to optax.adam run the same way")
    keys = ("ms", "ratio", "lo", "hi", "min", "max")
    width = max(len(n) for n in results) + 2
    print("".ljust(width) + "".join(k.rjust(10) for k in keys))
    for name, row in results.items():
        print(name.ljust(width) + "".join(f"{row[k]:10.3f}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "optax": optax.__version__,
                       "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
