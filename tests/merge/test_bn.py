import keras
import numpy as np
import pytest

from ensemblekit.merge import reset_bn

L = keras.layers


def test_statistics_equal_the_data_statistics_layer_by_layer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6), L.BatchNormalization(name="bn1"),
                              L.Dropout(0.5), L.Dense(4), L.BatchNormalization(name="bn2")])
    x = np.random.default_rng(0).normal(loc=3.0, size=(300, 5)).astype("float32")
    reset_bn(model, x, batch_size=64)
    numpy = keras.ops.convert_to_numpy
    h1 = numpy(model.layers[0](x))
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(numpy(bn1.moving_mean), h1.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy(bn1.moving_variance), h1.var(0), rtol=1e-4)
    h2 = numpy(model.layers[3](model.layers[2](bn1(h1, training=False), training=False)))
    np.testing.assert_allclose(numpy(model.get_layer("bn2").moving_mean), h2.mean(0), rtol=1e-4, atol=1e-5)
    out = model.predict(x, verbose=0)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)


def test_batches_limits_the_data_used_and_conv_reduces_over_positions():
    model = keras.Sequential([keras.Input((6, 2)), L.BatchNormalization()])
    x = np.concatenate([np.zeros((4, 6, 2)), np.ones((4, 6, 2))]).astype("float32")
    reset_bn(model, x, steps=1, batch_size=4)
    np.testing.assert_array_equal(model.layers[0].moving_mean.numpy(), [0.0, 0.0])
    reset_bn(model, x, batch_size=4)
    np.testing.assert_allclose(model.layers[0].moving_mean.numpy(), [0.5, 0.5])
    np.testing.assert_allclose(model.layers[0].moving_variance.numpy(), [0.25, 0.25])


def test_empty_x_is_an_error():
    model = keras.Sequential([keras.Input((2,)), L.BatchNormalization()])
    with pytest.raises(ValueError, match="reset_bn: x must be arrays with one number of rows"):
        reset_bn(model, np.zeros((0, 2)))


def test_batchnorm_inside_a_nested_model_is_reset_from_the_outer_inputs():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((5,)), L.Dense(6), L.BatchNormalization(name="inner_bn")], name="base")
    inputs = keras.Input((5,))
    outer = keras.Model(inputs, L.BatchNormalization(name="outer_bn")(L.Dense(3)(base(inputs))))
    x = np.random.default_rng(0).normal(loc=2.0, size=(200, 5)).astype("float32")
    reset_bn(outer, x, batch_size=32)
    numpy = keras.ops.convert_to_numpy
    hidden = numpy(base.layers[0](x))
    inner = base.get_layer("inner_bn")
    np.testing.assert_allclose(numpy(inner.moving_mean), hidden.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy(inner.moving_variance), hidden.var(0), rtol=1e-4)
    out = outer.predict(x, verbose=0)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)


def test_reset_bn_reads_datasets_and_refuses_one_shot_generators():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    x = np.random.default_rng(1).normal(size=(64, 3)).astype("float32")

    def batches():
        for start in range(0, 64, 16):
            yield (x[start:start + 16],)

    reset_bn(model, batches)
    np.testing.assert_allclose(model.layers[0].moving_mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="reset_bn: x is a one-shot Python generator"):
        reset_bn(model, batches())
