"""Callbacks that read the gradient statistics keras-clip optimizers record."""

from keras_clip.callbacks.histogram import GradientHistogramLogger
from keras_clip.callbacks.monitor import GradientAlarmError
from keras_clip.callbacks.monitor import GradientEvent
from keras_clip.callbacks.monitor import GradientMonitor
