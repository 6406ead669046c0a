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

Prints each part's result and time, and exits non-zero if any part failed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
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
        [python, "-m", "pip", "install", "-q", *OLDEST, "pytest", "-e", ROOT],
        check=True,
    )
    return python


def main():
    parts = ["tensorflow", "jax", "torch", "oldest-keras"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=parts, default=parts)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for part in args.only:
            start = time.monotonic()
            if part == "oldest-keras":
                command, env = pytest(oldest_keras(workdir), "tensorflow", OLDEST_TESTS)
            elif part == "tensorflow":
                command, env = pytest(sys.executable, part, [])
            else:
                command, env = pytest(sys.executable, part, BACKEND_TESTS)
            print(f"\n== {part}: {' '.join(command[1:])}", flush=True)
            run = subprocess.run(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
            )
            sys.stdout.write(run.stdout)
            last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
            results.append((part, run.returncode, last, time.monotonic() - start))
    print("\n== summary")
    for part, code, last, seconds in results:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{part:13} {status:18} {seconds:6.0f} s  {last}")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
