"""Keras training-loop internals: the loss Keras logs, and the optimizer
Keras wraps under mixed precision."""

from keras import ops

# The private names of Keras's training loop used here (tests/test_backend.py).
HOOKS = ("Trainer._loss_tracker",)


def filter_nonfinite_loss(model):
    """Makes the loss Keras logs leave out batches whose loss is NaN or Inf.

    Keras logs `loss` as a running mean (`model._loss_tracker`, a
    `keras.metrics.Mean` updated in the train step before the optimizer
    runs): one NaN batch makes it NaN for the rest of the epoch, even when
    the optimizer skipped that step. Filtered, the tracker adds a non-finite
    batch with weight 0, and its result is NaN only while no batch of the
    epoch so far had a finite loss (Keras's `Mean` would report 0 there).

    The train function must be traced after this; if the model already has
    one, it is dropped, so that `fit` makes a new one.

    Returns:
        Whether the model changed (False if it was filtered already or has
        no loss tracker yet).
    """
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None or getattr(tracker, "_keras_clip_finite", False):
        return False
    update_state, result = tracker.update_state, tracker.result

    def finite_update_state(values, sample_weight=None):
        values = ops.convert_to_tensor(values)
        finite = ops.all(ops.isfinite(values))
        weight = ops.cast(finite, values.dtype)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, values.dtype) * weight
        update_state(ops.where(finite, values, ops.zeros_like(values)), weight)

    def finite_result():
        return ops.where(
            tracker.count > 0, result(), ops.full((), float("nan"), tracker.dtype)
        )

    tracker.update_state = finite_update_state
    tracker.result = finite_result
    tracker._keras_clip_finite = True
    if getattr(model, "train_function", None) is not None:
        model.train_function = None
    return True


def forward_gradient_stats(loss_scale_optimizer_class):
    """Gives `LossScaleOptimizer` the statistics methods of its inner optimizer.

    Keras wraps the optimizer of every `mixed_float16` model in a
    `LossScaleOptimizer`, so `model.optimizer.gradient_stats()` must reach the
    keras-clip optimizer inside. Adds `gradient_stats` and
    `gradient_norms_by_variable`, which delegate to `inner_optimizer`, unless
    the class has them already.
    """

    def forward(name):
        def method(self, *args, **kwargs):
            inner = self.inner_optimizer
            if not hasattr(inner, name):
                raise AttributeError(
                    f"`{name}()` needs a keras-clip optimizer inside the "
                    "`LossScaleOptimizer`, e.g. `keras_clip.ClippedAdam`. "
                    f"Received: inner_optimizer={inner!r}"
                )
            return getattr(inner, name)(*args, **kwargs)

        method.__name__ = name
        method.__doc__ = f"The inner optimizer's `{name}()` (added by keras-clip)."
        return method

    for name in ("gradient_stats", "gradient_norms_by_variable"):
        if not hasattr(loss_scale_optimizer_class, name):
            setattr(loss_scale_optimizer_class, name, forward(name))
