"""TensorFlow's start-up log, kept out of keras-clip's command line.

Keras-free, so that `keras_clip/__init__.py` can use it before it imports
Keras: `python -m keras_clip` and `keras-clip` import the package first, and
nothing may come before a command's own first line.
"""

import importlib
import importlib.util
import os
import sys
import tempfile


def on_command_line():
    """Whether this process is `python -m keras_clip ...` or `keras-clip ...`."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("keras_clip"):
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]).startswith("keras-clip")


def import_quietly(name, if_installed=False):
    """Imports module `name` with TensorFlow's C++ start-up log silenced.

    `TF_CPP_MIN_LOG_LEVEL=3` (unless set) hides TensorFlow's C++ log; the lines
    it writes before its logging starts (`cudart_stub.cc`,
    `absl::InitializeLog`, `failed call to cuInit` when its devices are first
    listed) go to file descriptor 2 directly: it points to a temporary file
    during the import, and what was written there is replayed to stderr if
    the import fails. With `if_installed=True`, a module that is not
    installed is not imported (returns None).
    """
    if if_installed and importlib.util.find_spec(name) is None:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            failed = True
            try:
                module = importlib.import_module(name)
                if "tensorflow" in sys.modules:
                    sys.modules["tensorflow"].config.list_physical_devices()
                failed = False
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                if failed:
                    log.seek(0)
                    sys.stderr.write(log.read().decode(errors="replace"))
                    sys.stderr.flush()
    finally:
        os.close(saved)
    return module
