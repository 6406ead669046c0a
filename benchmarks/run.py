"""keras-clip benchmarks: step time and memory as ratios to plain Adam.

    python benchmarks/run.py [--parts a b c d] [--repeats 5] [--json out.json]

(a) the optimizer step alone: 64 tensors of 262,144 float32 (16.8M
    parameters), one XLA-compiled `apply`;
(b) a whole `fit` step, `jit_compile=True`: 2-layer LSTM(256), sequences of
    100 steps of 32 features, batch 64;
(c) the (b) step with `GradientMonitor` and `GradientHistogramLogger(freq=100)`;
(d) memory: the resident set the (a) loop adds once the weights and gradients
    exist (the optimizer's slots and state, XLA's buffers), each optimizer in
    its own process.

Every figure is the median over `--repeats` repeats (after warm-up) of the
per-step time, divided by plain Adam's measured in the same process, in
interleaved order; min and max of the per-repeat ratios are shown too.
Not part of the test run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

STEP_CONFIGS = {
    # name -> optimizer source (evaluated with keras and kc in scope)
    "Adam": "keras.optimizers.Adam(1e-3)",
    "Adam(global_clipnorm) [Keras]": "keras.optimizers.Adam(1e-3, global_clipnorm=1.0)",
    "Adam(clipnorm) [Keras]": "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    "Adam(clipvalue) [Keras]": "keras.optimizers.Adam(1e-3, clipvalue=1.0)",
    "ClippedAdam() no clipper": "kc.ClippedAdam(1e-3)",
    "GlobalNormClip": "kc.ClippedAdam(1e-3, clipper=kc.GlobalNormClip(1.0))",
    "NormClip": "kc.ClippedAdam(1e-3, clipper=kc.NormClip(1.0))",
    "ValueClip": "kc.ClippedAdam(1e-3, clipper=kc.ValueClip(1.0))",
    "AdaptiveGradClip": "kc.ClippedAdam(1e-3, clipper=kc.AdaptiveGradClip())",
    "AutoClip": "kc.ClippedAdam(1e-3, clipper=kc.AutoClip())",
    "ZClip": "kc.ClippedAdam(1e-3, clipper=kc.ZClip())",
    "AdaGC": "kc.ClippedAdam(1e-3, clipper=kc.AdaGC())",
}
FIT_CONFIGS = [
    "Adam", "Adam(global_clipnorm) [Keras]", "Adam(clipnorm) [Keras]",
    "Adam(clipvalue) [Keras]", "GlobalNormClip", "NormClip", "ValueClip",
    "AdaptiveGradClip",
]


def _optimizer(name):
    import keras  # noqa: F401

    import keras_clip as kc  # noqa: F401

    return eval(STEP_CONFIGS[name])


def _summary(times, base):
    """Median, min and max of per-repeat ratios to the base configuration."""
    out = {}
    for name, ts in times.items():
        ratios = np.array(ts) / np.array(times[base])
        out[name] = {
            "ms": float(np.median(ts) * 1e3),
            "ratio": float(np.median(ratios)),
            "min": float(ratios.min()),
            "max": float(ratios.max()),
        }
    return out


def _step_setup(seed=0):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.standard_normal(262_144).astype("float32") * 0.01)
        for _ in range(64)
    ]
    grads = [tf.constant(rng.standard_normal(262_144).astype("float32")) for _ in range(64)]
    return variables, grads


def part_a(repeats, calls=20):
    import tensorflow as tf

    variables, grads = _step_setup()
    steps = {}
    for name in STEP_CONFIGS:
        opt = _optimizer(name)
        fn = tf.function(lambda opt=opt: opt.apply(grads, variables), jit_compile=True)
        for _ in range(3):
            fn()
        steps[name] = fn
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            times[name].append(float(np.median(ts)))
    return _summary(times, "Adam")


class _StepTimer:
    """Per-batch wall time of `fit` (a Keras callback, duck-typed)."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(s, batch, logs=None):
                s.t = time.perf_counter()

            def on_train_batch_end(s, batch, logs=None):
                s.times.append(time.perf_counter() - s.t)

        self.callback = Timer()
        self.callback.times = []


def part_bc(repeats, steps=10, with_callbacks=True):
    import keras

    import keras_clip as kc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * steps, 100, 32)).astype("float32")
    y = rng.standard_normal((64 * steps, 1)).astype("float32") * 10

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((100, 32)),
            keras.layers.LSTM(256, return_sequences=True),
            keras.layers.LSTM(256),
            keras.layers.Dense(1),
        ])

    runs = {}
    configs = [(n, n, []) for n in FIT_CONFIGS]
    if with_callbacks:
        log_dir = tempfile.mkdtemp(prefix="kc-bench-")
        configs += [
            ("GlobalNormClip + GradientMonitor", "GlobalNormClip",
             [lambda: kc.GradientMonitor()]),
            ("GlobalNormClip + GradientHistogramLogger(freq=100)", "GlobalNormClip",
             [lambda: kc.GradientHistogramLogger(log_dir, freq=100)]),
        ]
    for label, opt_name, callbacks in configs:
        m = model()
        m.compile(_optimizer(opt_name), "mse", jit_compile=True)
        cbs = [make() for make in callbacks]
        m.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0, callbacks=cbs)
        runs[label] = (m, cbs)
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, (m, cbs) in runs.items():
            timer = _StepTimer()
            m.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False,
                  callbacks=cbs + [timer.callback])
            times[label].append(float(np.median(timer.callback.times)))
    return _summary(times, "Adam")


def _memory_child(name):
    import tensorflow as tf

    variables, grads = _step_setup()
    before = _resident_mb()
    opt = _optimizer(name)
    fn = tf.function(lambda: opt.apply(grads, variables), jit_compile=True)
    for _ in range(10):
        fn()
    print(json.dumps({"mb": _resident_mb() - before}))


def _resident_mb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def part_d():
    out = {}
    for name in STEP_CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name],
            capture_output=True, text=True, check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["mb"]
    base = out["Adam"]
    return {n: {"mb": mb, "ratio": mb / base} for n, mb in out.items()}


def _table(title, rows, keys=("ms", "ratio", "min", "max")):
    print(f"\n{title}")
    width = max(len(n) for n in rows) + 2
    print("".ljust(width) + "".join(k.rjust(9) for k in keys))
    for name, row in rows.items():
        print(name.ljust(width) + "".join(f"{row[k]:9.3f}" if k != "mb" else f"{row[k]:9.1f}" for k in keys))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"],
                        choices=["a", "b", "c", "d"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child)
        return 0
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5. Received: {args.repeats}")

    import keras
    import tensorflow as tf

    results = {"machine": {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
    }}
    print("machine:", results["machine"])
    if "a" in args.parts:
        results["a"] = part_a(args.repeats)
        _table("(a) optimizer step alone, 16.8M float32 params, XLA; ratio to Adam", results["a"])
    if "b" in args.parts or "c" in args.parts:
        bc = part_bc(args.repeats, with_callbacks="c" in args.parts)
        results["bc"] = bc
        _table("(b, c) fit step, 2x LSTM(256), 100x32 inputs, batch 64, XLA; ratio to Adam", bc)
    if "d" in args.parts:
        results["d"] = part_d()
        _table("(d) resident memory added by the optimizer in the (a) loop, MB; ratio to Adam", results["d"], keys=("mb", "ratio"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
