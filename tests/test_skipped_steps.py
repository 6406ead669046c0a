"""A skipped step does not mislead Keras's own callbacks.

With `nonfinite="skip"` a NaN batch changes no weight, but Keras logs `loss`
as a running mean that one NaN batch makes NaN for the whole epoch. With a
`GradientMonitor`, the logged loss leaves out batches whose loss is not
finite, so `History`, the progress bar, `TerminateOnNaN`, `EarlyStopping`
and `ReduceLROnPlateau` see the loss of the batches that trained.
"""

import keras
import numpy as np
import pytest

import keras_clip as kc
from keras_clip import backend

BATCH = 16


def model_and_data(policy="skip"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    # Plain SGD: a skipped step then leaves the run exactly where training
    # without that batch would be (no iteration-dependent state).
    model.compile(optimizer=kc.ClippedSGD(0.01, nonfinite=policy), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * BATCH, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 1))).astype("float32")
    return model, x, y


def poisoned(x):
    """`x` with one NaN in the second batch."""
    x = x.copy()
    x[BATCH + 3, 0] = np.nan
    return x


def fit(model, x, y, callbacks=(), epochs=4):
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[kc.GradientMonitor(on_nonfinite=None), *callbacks],
    )


def test_logged_loss_is_that_of_the_batches_that_trained():
    model, x, y = model_and_data()
    history = fit(model, poisoned(x), y)
    # The same run without the poisoned batch: the same weights, the same loss.
    clean, x_clean, y_clean = model_and_data()
    keep = np.r_[0:BATCH, 2 * BATCH:4 * BATCH]
    reference = fit(clean, x_clean[keep], y_clean[keep])
    np.testing.assert_allclose(
        history.history["loss"], reference.history["loss"], rtol=1e-6
    )
    for a, b in zip(model.get_weights(), clean.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert model.optimizer.gradient_stats()["nonfinite_steps"] == 4


@pytest.mark.parametrize("order", ["before", "after"])
def test_keras_callbacks_see_a_finite_loss(order):
    model, x, y = model_and_data()
    lr = keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0)
    terminate = keras.callbacks.TerminateOnNaN()
    callbacks = [terminate, lr, stop]
    history = model.fit(
        poisoned(x), y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
        callbacks=(
            [*callbacks, kc.GradientMonitor(on_nonfinite=None)] if order == "after"
            else [kc.GradientMonitor(on_nonfinite=None), *callbacks]
        ),
    )
    losses = history.history["loss"]
    assert len(losses) == 4 and np.all(np.isfinite(losses))  # no early stop
    assert np.all(np.diff(losses) < 0)  # it learned every epoch
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


def test_without_the_monitor_keras_logs_nan():
    # The control: Keras's own loss tracker, and the callbacks it misleads.
    model, x, y = model_and_data()
    history = model.fit(
        poisoned(x), y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert np.isnan(history.history["loss"][0]) and len(history.history["loss"]) == 1
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_an_epoch_without_a_finite_batch_logs_nan_not_zero():
    # Keras's Mean reports 0 when it has counted nothing: that would read as
    # a perfect epoch.
    model, x, y = model_and_data()
    x = np.full_like(x, np.nan)
    history = fit(model, x, y, epochs=2)
    assert np.all(np.isnan(history.history["loss"]))


def test_propagate_keeps_keras_loss():
    # With nonfinite="propagate" the NaN reaches the weights: the logged loss
    # must say so.
    model, x, y = model_and_data("propagate")
    history = fit(model, poisoned(x), y, epochs=1)
    assert np.isnan(history.history["loss"][0])


def test_a_model_trained_before_gets_the_filter():
    # The first fit traces the train function without the filter; a fit with
    # the monitor must not run that one.
    model, x, y = model_and_data()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    history = fit(model, poisoned(x), y, epochs=1)
    assert np.isfinite(history.history["loss"][0])
    assert not backend.filter_nonfinite_loss(model)  # once is enough


def test_guard_keras_loss_tracker():
    """keras-clip filters `model._loss_tracker`, a `Mean` set by `compile`."""
    model, _, _ = model_and_data()
    tracker = model._loss_tracker
    assert isinstance(tracker, keras.metrics.Mean)
    assert hasattr(tracker, "count") and hasattr(tracker, "total")
    assert model.train_function is None  # `fit` makes it when it is None
