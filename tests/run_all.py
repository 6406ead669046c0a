"""The whole test run, as CI runs it: every backend, the oldest Keras.

    python tests/run_all.py [--only PART ...]

Parts, each a `pytest` run in its own process:

- `tensorflow`: the whole suite (the doctests included) on TensorFlow.
- `jax`, `torch`: the tests that run on every backend (`BACKEND_TESTS`).
  Elsewhere in the suite, a TensorFlow-only test is marked
  `@pytest.mark.tensorflow(reason=...)`; under another backend it is
  skipped with that reason, so any file runs anywhere.
- `oldest-keras`: the oldest supported Keras and the TensorFlow that goes
  with it (`OLDEST`), in a new virtual environment that sees none of the
  installed packages, on the core, correctness and monitor tests.

The parts run in two lanes, one per core (TensorFlow's whole suite; the
others one after another). Prints each part's output and a summary with its
result and time, and exits non-zero if any part failed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKEND_TESTS = [
    "tests/test_backends.py",
    "tests/test_reference_path.py",
    "tests/test_clippers.py",
    "tests/test_adaptive.py",
    "tests/test_histogram.py",
    "tests/test_monitor.py",
    "keras_clip",
]
# The oldest Keras keras-clip supports (setup.cfg), with its TensorFlow.
OLDEST = ["keras==3.8.0", "tensorflow==2.19.1"]
OLDEST_TESTS = [
    "tests/test_backend.py",
    "tests/test_optimizers.py",
    "tests/test_correctness.py",
    "tests/test_monitor.py",
    # (the rest of that file reads XLA's HLO, which differs by TensorFlow release)
    "tests/test_performance.py::test_the_first_fit_traces_the_step_once",
]


def pytest(python, backend, paths, env=None):
    env = {**os.environ, **(env or {}), "KERAS_BACKEND": backend}
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], env


def oldest_keras(workdir):
    """Creates the virtual environment of `OLDEST` (returns its python)."""
    venv = os.path.join(workdir, "oldest-keras")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", *OLDEST, "pytest"], check=True
    )
    return python


def run(part, workdir):
    """Runs one part; returns `(part, exit code, its output, seconds)`."""
    start = time.monotonic()
    if part == "oldest-keras":
        # keras-clip from this tree (`python -m pytest` runs from ROOT).
        command, env = pytest(oldest_keras(workdir), "tensorflow", OLDEST_TESTS)
    elif part == "tensorflow":
        command, env = pytest(sys.executable, part, [])
    else:
        command, env = pytest(sys.executable, part, BACKEND_TESTS)
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    header = f"== {part}: {' '.join(command[1:])}\n"
    return part, done.returncode, header + done.stdout, time.monotonic() - start


def lane(parts, workdir, results):
    for part in parts:
        result = run(part, workdir)
        sys.stdout.write("\n" + result[2])
        sys.stdout.flush()
        results.append(result)


def main():
    parts = ["tensorflow", "jax", "torch", "oldest-keras"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=parts, default=parts)
    args = parser.parse_args()
    # Two lanes, one per core: TensorFlow's whole suite, and the rest.
    lanes = [[p for p in args.only if p == "tensorflow"],
             [p for p in args.only if p != "tensorflow"]]
    results = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        threads = [
            threading.Thread(target=lane, args=(parts, workdir, results))
            for parts in lanes if parts
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print("\n== summary")
    for part, code, output, seconds in sorted(results, key=lambda r: parts.index(r[0])):
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        last = output.strip().splitlines()[-1] if output.strip() else ""
        print(f"{part:13} {status:18} {seconds:6.0f} s  {last}")
    print(f"all parts: {time.monotonic() - start:.0f} s")
    return 0 if len(results) == len(args.only) and all(r[1] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
