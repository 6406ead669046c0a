"""`GradientHistogramLogger`: per-layer histograms of `log10|g|` in TensorBoard.

The bucket counts are one of the optimizer's statistics, recorded on request:
the callback hands the optimizer a `stats.GradientHistograms`
(`record_gradient_histograms`), the step counts every `freq`-th update into
it, and the callback reads the counts after the step and writes them as
precomputed TensorBoard histograms (`tf.summary` cannot run inside an
XLA-compiled step, and `tf.histogram_fixed_width` does not compile). The
callback reads the step; it does not rewrite it.
"""

import importlib.util
import math
import numbers
import os
import time

import keras
import numpy as np
from keras import ops

from keras_clip import _checks
from keras_clip import stats
from keras_clip.optimizers import BUILTIN
from keras_clip.optimizers import ClippingMixin

# The default edges: `bins` evenly spaced bins over this range of log10|g|.
DEFAULT_RANGE = (-12.0, 4.0)
PER = ("layer", "variable")

_DESCRIPTIONS = {
    "grad_norm": "global gradient norm before clipping",
    "clipped_grad_norm": "global gradient norm after clipping",
    "clip_rate": "fraction of the steps clipped since the previous point",
    "clip_threshold": "the clipping threshold",
    "layer_norm": "gradient norm before clipping",
}
_INSTALL = "GradientHistogramLogger needs TensorBoard: pip install tensorboard"


def bucket_edges(bins):
    """The bucket edges over `log10|g|` for a `bins` argument, as float32.

    Args:
        bins: An int: that many evenly spaced bins over `DEFAULT_RANGE`
            (`[-12, 4]`). Or a sequence of at least 2 finite, strictly
            increasing edges.

    Returns:
        A 1-D float32 NumPy array of edges.
    """
    what = "an integer or an increasing sequence of edges"
    if isinstance(bins, numbers.Integral) and not isinstance(bins, bool):
        bins = _checks.number("bins", bins, low=1, low_open=False, integer=True)
        return np.linspace(*DEFAULT_RANGE, bins + 1).astype("float32")
    if isinstance(bins, (str, bytes)) or not isinstance(
        bins, (list, tuple, np.ndarray)
    ):
        raise TypeError(f"`bins` must be {what}. Received: bins={bins!r}")
    if not all(_checks._is_real(e) for e in np.asarray(bins, dtype=object).ravel()):
        raise TypeError(f"`bins` must be {what}. Received: bins={bins!r}")
    edges = np.asarray(bins, dtype="float64")
    if (
        edges.ndim != 1
        or edges.size < 2
        or not np.all(np.isfinite(edges))
        or not np.all(np.diff(edges) > 0)
    ):
        raise ValueError(
            "`bins` edges must be at least 2 finite, strictly increasing "
            f"numbers. Received: bins={bins!r}"
        )
    edges32 = edges.astype("float32")
    if not np.all(np.diff(edges32) > 0):
        raise ValueError(
            "`bins` edges must stay strictly increasing in float32. "
            f"Received: bins={bins!r}"
        )
    return edges32


def _has_tensorboard():
    """Whether the `tensorboard` package is installed (nothing is imported)."""
    return importlib.util.find_spec("tensorboard") is not None


@keras.saving.register_keras_serializable(package="keras_clip")
class GradientHistogramLogger(keras.callbacks.Callback):
    """Writes per-layer histograms of gradient magnitudes to TensorBoard.

    Every `freq` optimizer steps (the first step, then every `freq`-th), the
    gradients of that step, before clipping, are binned by `log10|g|` inside
    the compiled step, and the callback writes one histogram per layer (or
    variable) to `log_dir/train`, the run of `keras.callbacks.TensorBoard`
    with the same `log_dir`, so both callbacks can share one `fit`:

    ```
    gradients/<layer path>                 histogram of log10|g|
    gradient_zero_fraction/<layer path>    fraction of entries with g == 0
    gradient_nonfinite/<layer path>        number of NaN or infinite entries
    ```

    The step of these summaries is the optimizer's iteration count when the
    logged step began: 0, `freq`, `2 * freq`, ... The histogram holds the
    non-zero finite entries: the bins of `bins`, an underflow bucket (below
    the first edge) and an overflow bucket (at or above the last edge), the
    last two drawn one bin wide just outside the range. Zeros
    (`log10|0| = -inf`) and NaN/inf entries have no place on that axis: they
    are counted in buckets of their own and written as the two scalars
    above, so nothing is dropped: histogram, zeros and non-finite entries
    add up to the layer's size. A sparse (`Embedding`) gradient counts its
    absent rows as zeros.

    With `scalars=True`, also read from the optimizer's statistics (not
    recomputed):

    ```
    gradient_stats/grad_norm           global norm before clipping
    gradient_stats/clipped_grad_norm   global norm after clipping
    gradient_stats/clip_rate           fraction of steps clipped since the
                                       previous point
    gradient_stats/clip_threshold      the threshold (when it is finite)
    gradient_norms/<layer path>        norm of the layer's gradient
    ```

    Those are read after the step and stamped with the step they belong to:
    the logged step, or with `steps_per_execution > 1` the last step of its
    execution. The counts of a logged step are kept until the callback
    writes them after the execution, so with `steps_per_execution > freq`
    only the last logged step of each execution is written.

    Between logging steps the cost is one comparison in the step and the
    read of one scalar variable per batch end. The callback needs a
    keras-clip optimizer (possibly inside a `LossScaleOptimizer`), and the
    `tensorboard` package, whose own event-file writer it uses on every
    backend (TensorFlow is not needed).

    At the start of `fit` the callback asks the optimizer for the counts
    (`opt.record_gradient_histograms`) and, if that changes what the step
    records, has Keras trace the train function again; it never replaces
    the train function. The optimizer goes on counting every `freq` updates
    after `fit` (one comparison per step);
    `opt.record_gradient_histograms(None)` followed by
    `model.make_train_function(force=True)` stops it. When `fit` raises,
    Keras skips `on_train_end`: the event file is then closed at the next
    `fit` with this callback (or by `logger.on_train_end()`).

    Args:
        log_dir: String or path: the TensorBoard log directory; the event
            files go to `log_dir/train`. Nothing is created before training
            begins; then the directory and an event file are created, and a
            `log_dir` that cannot be written fails with a `ValueError`,
            before the first step.
        freq: Positive int: log every `freq` optimizer steps (with
            `gradient_accumulation_steps`, every `freq` updates).
            Defaults to 100.
        bins: Int: that many evenly spaced bins over `log10|g|` in
            `[-12, 4]`; or a sequence of strictly increasing edges over
            `log10|g|` (evenly spaced edges are binned fastest). Bins are
            half-open, `[left, right)`. Defaults to 64 (quarter decades).
        per: `"layer"` (variables grouped by their layer's path) or
            `"variable"`. Defaults to `"layer"`.
        scalars: Bool: also write the scalars listed above.
            Defaults to `True`.

    Example:

    >>> logger = GradientHistogramLogger("/tmp/logs", freq=100)
    >>> # model.compile(optimizer=ClippedAdam(global_clipnorm=1.0), loss="mse")
    >>> # model.fit(x, y, callbacks=[logger, keras.callbacks.TensorBoard("/tmp/logs")])
    """

    def __init__(self, log_dir, freq=100, bins=64, per="layer", scalars=True):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(
                f"`log_dir` must be a string or a path. Received: log_dir={log_dir!r}"
            )
        if not os.fspath(log_dir):
            raise ValueError(
                f"`log_dir` must not be empty. Received: log_dir={log_dir!r}"
            )
        freq = _checks.number("freq", freq, low=1, low_open=False, integer=True)
        edges = bucket_edges(bins)
        per = _checks.choice("per", per, PER)
        if not isinstance(scalars, bool):
            raise TypeError(
                f"`scalars` must be a bool. Received: scalars={scalars!r}"
            )
        if not _has_tensorboard():
            raise ImportError(_INSTALL)
        self.log_dir = log_dir
        self.freq = freq
        self.bins = bins
        self.per = per
        self.scalars = scalars
        self._edges = edges
        self._writer_ = None
        self._optimizer = None
        # The request handed to the optimizer, reused by later `fit`s while
        # it still fits (see `_request`).
        self._histograms = None
        self._request_key = None
        self._names = []
        self._written_step = -1
        self._batches_to_read = 0

    # Bucket layout.

    @property
    def edges(self):
        """The bin edges over `log10|g|`, as a float32 NumPy array."""
        return self._edges.copy()

    def _histogram_edges(self):
        """Left and right edges of the written buckets (underflow..overflow)."""
        e = self._edges.astype("float64")
        left = np.concatenate([[e[0] - (e[1] - e[0])], e])
        right = np.concatenate([e, [e[-1] + (e[-1] - e[-2])]])
        return left, right

    def _group_name(self, variable):
        path = _variable_path(variable)
        if self.per == "variable" or "/" not in path:
            return path
        return path.rsplit("/", 1)[0]

    # Callback hooks.

    def on_train_begin(self, logs=None):
        opt = self._clipping_optimizer()
        self._close_writer()  # left open by a `fit` that raised
        self._open_writer()
        request = self._request(opt)
        if opt.record_gradient_histograms(request):
            # The step follows the request from its next trace on.
            self.model.make_train_function(force=True)
        self._optimizer = opt
        self._previous = self._read_steps(opt)
        # Counts taken while this callback was not listening are not written.
        self._written_step = request.read()[0]
        self._schedule_read()

    def _open_writer(self):
        """Creates the event file now: an unwritable `log_dir` fails before
        the optimizer is asked for anything and before the first step."""
        try:
            self._writer  # noqa: B018 (the property creates the writer)
        except Exception as err:
            directory = os.path.join(os.fspath(self.log_dir), "train")
            raise ValueError(
                "GradientHistogramLogger cannot write its event files to "
                f"`log_dir`: creating {directory!r} failed with "
                f"{type(err).__name__} (see above). "
                f"Received: log_dir={self.log_dir!r}"
            ) from err

    def _request(self, opt):
        """The `stats.GradientHistograms` for the model's trainable variables.

        The previous `fit`'s request when the optimizer, the variables, the
        edges, `freq` and the groups are the same: the optimizer then reports
        no change, and the step traced with it is not traced again.
        """
        trainable = self.model.trainable_variables
        names = {}
        groups = {
            _variable_path(v): names.setdefault(self._group_name(v), len(names))
            for v in trainable
        }
        key = (opt, [id(v) for v in trainable])
        old = self._histograms
        if (
            old is None
            or self._request_key != key
            or old.freq != self.freq
            or not np.array_equal(old.edges, self._edges)
            or old.groups != groups
        ):
            self._histograms = stats.GradientHistograms(
                self._edges, self.freq, groups
            )
            self._request_key = key
            self._names = list(names)
        return self._histograms

    def on_train_batch_end(self, batch, logs=None):
        self._batches_to_read -= 1
        if self._batches_to_read <= 0:
            self._write_if_new()

    def on_epoch_end(self, epoch, logs=None):
        if self._writer_ is not None:
            self._writer_.flush()

    def on_train_end(self, logs=None):
        try:
            self._write_if_new()
        finally:
            self._close_writer()

    def _close_writer(self):
        if self._writer_ is not None:
            self._writer_.close()
            self._writer_ = None

    def _clipping_optimizer(self):
        optimizer = getattr(self.model, "optimizer", None)
        inner = optimizer
        while isinstance(inner, keras.optimizers.LossScaleOptimizer):
            inner = inner.inner_optimizer
        if isinstance(inner, ClippingMixin):
            return inner
        name = type(inner).__name__
        suggestion = (
            f"`keras_clip.Clipped{name}(...)`"
            if f"Clipped{name}" in BUILTIN
            else "`keras_clip.clipped(cls)(...)`"
        )
        raise TypeError(
            "GradientHistogramLogger bins the gradients inside the step of a "
            f"keras-clip optimizer, and the model's optimizer `{name}` is not "
            f"one. Compile the model with {suggestion}. "
            f"Received: optimizer={optimizer!r}"
        )

    # Writing.

    @property
    def _writer(self):
        if self._writer_ is None:
            directory = os.path.join(os.fspath(self.log_dir), "train")
            self._writer_ = _Writer(directory)
        return self._writer_

    def _write_if_new(self):
        if self._histograms is None:
            return
        self.model  # noqa: B018 (on JAX, Keras's `model` property brings the step's state back)
        step, counts = self._histograms.read()
        self._schedule_read()
        if step < 0 or step == self._written_step:
            return
        self._written_step = step
        self._write(step, counts.astype("int64"))

    def _schedule_read(self):
        """Reads again after the fewest batches in which the next counted
        update can run: a read after every batch cost as much as 6-8% of a
        5 ms step."""
        done = int(ops.convert_to_numpy(self._optimizer.iterations))
        due = -(-done // self.freq) * self.freq  # the next counted update
        per_batch = max(int(getattr(self.model, "steps_per_execution", 1) or 1), 1)
        self._batches_to_read = -(-(due - done + 1) // per_batch)

    def _write(self, step, counts):
        writer = self._writer
        left, right = self._histogram_edges()
        description = (
            "log10|g| of the gradients before clipping; underflow and overflow "
            "drawn one bin wide outside the edges (keras_clip)"
        )
        for name, c in zip(self._names, counts):
            buckets = np.stack([left, right, c[1:-1]], axis=1).astype("float64")
            writer.write(f"gradients/{name}", buckets, step, "histograms",
                         description)
            total = max(int(c.sum()), 1)
            writer.write(f"gradient_zero_fraction/{name}", c[0] / total, step,
                         "scalars", "fraction of gradient entries equal to 0")
            writer.write(f"gradient_nonfinite/{name}", c[-1], step, "scalars",
                         "number of NaN or infinite gradient entries")
        if self.scalars:
            self._write_scalars(writer)
        writer.flush()

    def _write_scalars(self, writer):
        opt = self._optimizer
        current = opt.gradient_stats()
        # The statistics are those of the last step run.
        step = int(ops.convert_to_numpy(opt.iterations)) - 1
        steps, clipped = current["steps"], current["clipped_steps"]
        prev_steps, prev_clipped = self._previous
        self._previous = (steps, clipped)
        rate = 0.0
        if steps > prev_steps:
            rate = (clipped - prev_clipped) / (steps - prev_steps)
        values = {
            "grad_norm": current["grad_norm"],
            "clipped_grad_norm": current["clipped_grad_norm"],
            "clip_rate": rate,
        }
        if math.isfinite(current["clip_threshold"]):
            values["clip_threshold"] = current["clip_threshold"]
        for name, value in values.items():
            writer.write(f"gradient_stats/{name}", value, step, "scalars",
                         _DESCRIPTIONS[name])
        squares = {}
        for path, norm in opt.gradient_norms_by_variable().items():
            i = self._histograms.groups.get(path)
            if i is not None:
                squares[i] = squares.get(i, 0.0) + norm * norm
        for i, name in enumerate(self._names):
            writer.write(f"gradient_norms/{name}", math.sqrt(squares.get(i, 0.0)),
                         step, "scalars", _DESCRIPTIONS["layer_norm"])

    @staticmethod
    def _read_steps(opt):
        if not opt.built:
            return (0, 0)
        current = opt.gradient_stats()
        return (current["steps"], current["clipped_steps"])

    def get_config(self):
        return {
            "log_dir": os.fspath(self.log_dir),
            "freq": self.freq,
            "bins": (
                int(self.bins)
                if isinstance(self.bins, numbers.Integral)
                else np.asarray(self.bins, "float64").tolist()
            ),
            "per": self.per,
            "scalars": self.scalars,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _variable_path(variable):
    return getattr(variable, "path", None) or variable.name


# Event files, through TensorBoard's own writer (the `tensorboard` package,
# which needs no TensorFlow): a histogram is a float64 tensor of (left,
# right, count) rows under the "histograms" plugin, a scalar a float32
# scalar under "scalars"; both plugins' data protos at version 0 serialize
# to b"".


class _Writer:
    def __init__(self, directory):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(directory)

    def write(self, tag, value, step, plugin, description):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        dtype = "float64" if plugin == "histograms" else "float32"
        metadata = summary_pb2.SummaryMetadata(
            summary_description=description,
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        )
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=tag,
                    metadata=metadata,
                    tensor=tensor_util.make_tensor_proto(np.asarray(value, dtype)),
                )
            ]
        )
        self._writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        )

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()
