"""keras-clip: gradient clipping for Keras 3 that is correct, adaptive,
observable and free of cost."""

from keras_clip import _quiet

if _quiet.on_command_line():
    # `python -m keras_clip` and `keras-clip`: TensorFlow's start-up log must
    # not come before the command's own first line.
    _quiet.import_quietly("keras")
    # On another backend, TensorBoard's writers import TensorFlow (when it is
    # installed) later, in the middle of the command's output.
    _quiet.import_quietly("tensorflow", if_installed=True)

import keras  # noqa: E402

from keras_clip import ops  # noqa: E402
from keras_clip.callbacks import GradientHistogramLogger
from keras_clip.callbacks import GradientMonitor
from keras_clip.clippers import AdaGC
from keras_clip.clippers import AdaptiveGradClip
from keras_clip.clippers import AutoClip
from keras_clip.clippers import Clipper
from keras_clip.clippers import GlobalNormClip
from keras_clip.clippers import NormClip
from keras_clip.clippers import ValueClip
from keras_clip.clippers import ZClip
from keras_clip.finder import suggest_threshold
from keras_clip.optimizers import ClippedAdadelta
from keras_clip.optimizers import ClippedAdafactor
from keras_clip.optimizers import ClippedAdagrad
from keras_clip.optimizers import ClippedAdam
from keras_clip.optimizers import ClippedAdamax
from keras_clip.optimizers import ClippedAdamW
from keras_clip.optimizers import ClippedFtrl
from keras_clip.optimizers import ClippedLamb
from keras_clip.optimizers import ClippedLion
from keras_clip.optimizers import ClippedNadam
from keras_clip.optimizers import ClippedRMSprop
from keras_clip.optimizers import ClippedSGD
from keras_clip.optimizers import ClippingMixin
from keras_clip.optimizers import clipped

__version__ = "0.1.0"

__all__ = [
    "AdaGC",
    "AdaptiveGradClip",
    "AutoClip",
    "ClippedAdadelta",
    "ClippedAdafactor",
    "ClippedAdagrad",
    "ClippedAdam",
    "ClippedAdamW",
    "ClippedAdamax",
    "ClippedFtrl",
    "ClippedLamb",
    "ClippedLion",
    "ClippedNadam",
    "ClippedRMSprop",
    "ClippedSGD",
    "Clipper",
    "ClippingMixin",
    "GlobalNormClip",
    "GradientHistogramLogger",
    "GradientMonitor",
    "NormClip",
    "ValueClip",
    "ZClip",
    "clipped",
    "ops",
    "suggest_threshold",
]

# Optimizers only some Keras releases have.
if hasattr(keras.optimizers, "Muon"):  # Keras 3.10 and later
    from keras_clip.optimizers import ClippedMuon  # noqa: E402

    __all__ += ["ClippedMuon"]
if hasattr(keras.optimizers, "ScheduleFreeAdamW"):  # Keras 3.14 and later
    from keras_clip.optimizers import ClippedScheduleFreeAdamW  # noqa: E402

    __all__ += ["ClippedScheduleFreeAdamW"]
