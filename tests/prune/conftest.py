"""Models shared by the pruning tests: a tiny CNN with BatchNorm + residual Add, trained on mnist1d."""

import keras
import numpy as np
import pytest


def make_residual_cnn(seed=0, width=32, input_shape=(40, 1), classes=10, name="res_cnn"):
    """Conv-BN-ReLU, a residual Conv-BN block joined by Add, a third conv, Flatten, two Dense."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    h = layers.Conv1D(width, 5, padding="same", name="conv_a")(inputs)
    h = layers.BatchNormalization(name="bn_a")(h)
    h = layers.ReLU(name="relu_a")(h)
    r = layers.Conv1D(width, 3, padding="same", name="conv_b")(h)
    r = layers.BatchNormalization(name="bn_b")(r)
    h = layers.Add(name="residual")([h, r])
    h = layers.Activation("relu", name="relu_b")(h)
    h = layers.MaxPooling1D(2, name="pool_b")(h)
    h = layers.Conv1D(2 * width, 3, padding="same", name="conv_c")(h)
    h = layers.BatchNormalization(name="bn_c")(h)
    h = layers.ReLU(name="relu_c")(h)
    h = layers.MaxPooling1D(2, name="pool_c")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(2 * width, activation="relu", name="hidden")(h)
    h = layers.Dropout(0.1, name="dropout")(h)
    outputs = layers.Dense(classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def compile_classifier(model, learning_rate=2e-3):
    model.compile(keras.optimizers.Adam(learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def fine_tune(model, x, y, epochs, learning_rate=2e-3, batch_size=64, callbacks=None, seed=0):
    """Seeded Adam with cosine decay over ``epochs``: the short fine-tune used after pruning."""
    keras.utils.set_random_seed(seed)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    compile_classifier(model, keras.optimizers.schedules.CosineDecay(learning_rate, steps))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=callbacks)
    return model


def accuracy(model, x, y):
    return float(np.mean(np.asarray(model.predict(x, batch_size=512, verbose=0)).argmax(-1) == y))


def randomize_bn(model, seed=0):
    """Give every BatchNormalization non-trivial statistics, so slicing errors show in outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    return model


@pytest.fixture(scope="session")
def trained_cnn(mnist1d):
    """``(model, (x, y), (xt, yt))``: the residual CNN trained 12 epochs on mnist1d (about 15 s)."""
    (x, y), (xt, yt) = mnist1d
    model = compile_classifier(make_residual_cnn(seed=1))
    model.fit(x, y, epochs=12, batch_size=64, verbose=0)
    return model, (x, y), (xt, yt)
