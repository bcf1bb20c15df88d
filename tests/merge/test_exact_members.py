"""Merging is exact on the functions members compute, or refuses: LoRA, quantized, other configs."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.merge.variables import effective_kernel

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 6)).astype("float32")


def mlp(seed, activation="relu", inputs=6):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(8, activation=activation),
                             keras.layers.Dense(3)])


def numpy_mlp(kernels, biases, x, activation=lambda v: np.maximum(v, 0)):
    hidden = activation(x @ kernels[0] + biases[0])
    return hidden @ kernels[1] + biases[1]


def with_lora(seed, rank=2):
    model = mlp(seed)
    rng = np.random.default_rng(seed + 10)
    for layer in model.layers:
        layer.enable_lora(rank, lora_alpha=3)
        layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape))
    return model


def lora_effective(layer):
    return layer._kernel.numpy() + (layer.lora_alpha / layer.lora_rank) * (
        layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy())


def test_lora_members_merge_on_their_effective_kernels_into_plain_layers():
    members = [with_lora(0), with_lora(1)]
    merged = ek.merge(members, method="linear")
    assert not any(getattr(layer, "lora_enabled", False) for layer in merged.layers)
    kernels = [np.mean([lora_effective(m.layers[i]) for m in members], axis=0) for i in range(2)]
    biases = [np.mean([m.layers[i].bias.numpy() for m in members], axis=0) for i in range(2)]
    for i in range(2):
        np.testing.assert_allclose(merged.layers[i].kernel.numpy(), kernels[i], atol=1e-5)
    np.testing.assert_allclose(merged.predict(X, verbose=0), numpy_mlp(kernels, biases, X), atol=1e-4)
    # The mean of the factors (what a tensor-by-tensor average computes) is another function.
    naive = np.mean([m.layers[0].lora_kernel_a.numpy() for m in members], axis=0) @ np.mean(
        [m.layers[0].lora_kernel_b.numpy() for m in members], axis=0)
    naive = np.mean([m.layers[0]._kernel.numpy() for m in members], axis=0) + 1.5 * naive
    assert np.abs(naive - kernels[0]).max() > 0.1


def test_a_lora_member_merges_with_a_plain_one_and_one_member_merge_folds_it():
    lora, plain = with_lora(0), mlp(1)
    merged = ek.merge([lora, plain])
    expected = (lora_effective(lora.layers[0]) + plain.layers[0].kernel.numpy()) / 2
    np.testing.assert_allclose(merged.layers[0].kernel.numpy(), expected, atol=1e-5)
    folded = ek.merge([lora])
    np.testing.assert_allclose(folded.predict(X, verbose=0), lora.predict(X, verbose=0), atol=1e-5)


@pytest.mark.parametrize("mode,config", [
    ("int8", None),
    ("int4", None),  # sub-channel blocks (Keras' default block size)
    ("int4", "per_channel"),
])
def test_quantized_members_are_dequantized_merged_and_quantized_again(mode, config):
    members = [mlp(0), mlp(1)]
    for member in members:
        if config == "per_channel":
            member.quantize(config=keras.quantizers.Int4QuantizationConfig(block_size=-1))
        else:
            member.quantize(mode)
    floats = [[effective_kernel(m.layers[i]) for m in members] for i in range(2)]
    kernels = [np.mean(f, axis=0) for f in floats]
    biases = [np.mean([m.layers[i].bias.numpy() for m in members], axis=0) for i in range(2)]
    reference = numpy_mlp(kernels, biases, X)

    float_merge = ek.merge(members, quantize=False)
    assert [layer.quantization_mode for layer in float_merge.layers] == [None, None]
    np.testing.assert_allclose(float_merge.predict(X, verbose=0), reference, atol=1e-4)

    merged = ek.merge(members)
    assert [layer.quantization_mode for layer in merged.layers] == [mode, mode]
    assert merged.layers[0].dtype_policy.name == members[0].layers[0].dtype_policy.name
    # Re-quantizing costs only the quantization error of one model, not the 2.26 of averaged codes.
    error = np.abs(merged.predict(X, verbose=0) - reference).max()
    assert error < 0.15 * np.abs(reference).max(), error
    if mode == "int8":  # averaging the codes (what a tensor-by-tensor merge did) is another kernel
        codes = np.mean([m.layers[0]._kernel.numpy().astype("float64") for m in members], axis=0)
        assert not np.allclose(codes, kernels[0], atol=0.1)


def test_quantized_einsum_dense_and_embedding_dequantize_by_keras_rules():
    def model(seed):
        keras.utils.set_random_seed(seed)
        tokens = keras.Input((5,), dtype="int32")
        hidden = keras.layers.Embedding(20, 4)(tokens)
        hidden = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 3), bias_axes="d")(hidden)
        return keras.Model(tokens, keras.layers.GlobalAveragePooling1D()(hidden))

    members = [model(0), model(1)]
    tokens = np.random.default_rng(1).integers(0, 20, size=(8, 5))
    for member in members:
        member.quantize("int8")
    merged = ek.merge(members, quantize=False)
    for position in (1, 2):
        expected = np.mean([effective_kernel(m.layers[position]) for m in members], axis=0)
        weight = merged.layers[position].weights[0].numpy()
        np.testing.assert_allclose(weight, expected, atol=1e-6)
    # Dequantized members compute the members' own functions (within the int8 error).
    one = ek.merge([members[0]], quantize=False)
    np.testing.assert_allclose(one.predict(tokens, verbose=0), members[0].predict(tokens, verbose=0),
                               atol=1e-5)


def test_float8_members_are_refused_with_the_reason():
    members = [mlp(0), mlp(1)]
    for member in members:
        member.quantize("float8")
    with pytest.raises(ValueError, match=r"merge: member 0 .*layer 'dense.*' is float8-quantized"):
        ek.merge(members)


def test_members_with_another_activation_are_refused_naming_layer_and_key():
    with pytest.raises(ValueError, match=r"member 1 .*layer 'dense_\d+' \(Dense\) has activation='tanh'.*'relu'"):
        ek.merge([mlp(0, "relu"), mlp(1, "tanh")])


@pytest.mark.parametrize("layer_a,layer_b,key", [
    (keras.layers.LayerNormalization(epsilon=1e-3), keras.layers.LayerNormalization(epsilon=1e-5), "epsilon"),
    (keras.layers.Conv1D(4, 3, padding="same"), keras.layers.Conv1D(4, 3, padding="causal"), "padding"),
    (keras.layers.Conv1D(4, 3, strides=1), keras.layers.Conv1D(4, 3, strides=2), "strides"),
    (keras.layers.BatchNormalization(axis=-1), keras.layers.BatchNormalization(axis=1), "axis"),
])
def test_every_function_changing_key_is_refused(layer_a, layer_b, key):
    def model(layer, seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4, 4)), layer, keras.layers.GlobalAveragePooling1D(),
                                 keras.layers.Dense(2)])

    try:
        members = [model(layer_a, 0), model(layer_b, 1)]
    except ValueError:
        pytest.skip("this pair cannot be built with equal shapes")
    with pytest.raises(ValueError, match=rf"has {key}="):
        ek.merge(members)


def test_initializers_names_and_dropout_rates_do_not_block_a_merge():
    def model(seed, initializer, rate):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, kernel_initializer=initializer),
                                 keras.layers.Dropout(rate), keras.layers.Dense(3)])

    merged = ek.merge([model(0, "glorot_uniform", 0.1), model(1, "he_normal", 0.5)])
    assert merged.count_params() == model(2, "zeros", 0.0).count_params()


def test_batchnorm_statistics_are_averaged_not_task_arithmetic():
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                 keras.layers.Dense(3)])

    base, members = model(9), [model(0), model(1)]
    rng = np.random.default_rng(3)
    for member in members:
        member.layers[1].moving_variance.assign(rng.uniform(0.1, 3.0, 8))
    base.layers[1].moving_variance.assign(np.full(8, 5.0))
    merged = ek.merge(members, method="ties", base=base, density=0.5)
    expected = np.mean([m.layers[1].moving_variance.numpy() for m in members], axis=0)
    np.testing.assert_allclose(merged.layers[1].moving_variance.numpy(), expected, rtol=1e-6)


@keras.saving.register_keras_serializable(package="ensemblekit_tests")
class RunningScale(keras.layers.Layer):
    """A layer with a non-trainable float of its own meaning (not a weight, not a known statistic)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", trainable=False,
                                     name="running_scale")

    def call(self, inputs):
        return inputs * self.scale


def test_a_non_trainable_float_of_unknown_meaning_is_refused():
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), RunningScale(), keras.layers.Dense(3)])

    with pytest.raises(ValueError, match=r"running_scale.*non-trainable float of unknown meaning"):
        ek.merge([model(0), model(1)])


def test_streamed_lora_files_merge_on_effective_kernels(tmp_path):
    members = [with_lora(0), with_lora(1)]
    paths = []
    for i, member in enumerate(members):
        paths.append(str(tmp_path / f"m{i}.keras"))
        member.save(paths[-1])
    streamed = ek.merge(paths, stream=True)
    expected = np.mean([lora_effective(m.layers[0]) for m in members], axis=0)
    np.testing.assert_allclose(streamed.layers[0].kernel.numpy(), expected, atol=1e-5)
    assert not getattr(streamed.layers[0], "lora_enabled", False)


def test_streaming_refuses_quantized_files(tmp_path):
    paths = []
    for i in range(2):
        member = mlp(i)
        member.quantize("int8")
        paths.append(str(tmp_path / f"q{i}.keras"))
        member.save(paths[-1])
    with pytest.raises(ValueError, match=r"int8-quantized.*stream=False"):
        ek.merge(paths, stream=True)
    merged = ek.merge(paths, stream=False)
    assert merged.layers[0].quantization_mode == "int8"


@pytest.mark.parametrize("kind", ["lora", "int8"])
def test_pack_and_align_refuse_adapted_members(kind):
    members = [with_lora(0), with_lora(1)] if kind == "lora" else [mlp(0), mlp(1)]
    if kind == "int8":
        for member in members:
            member.quantize("int8")
    reason = "LoRA enabled" if kind == "lora" else "int8-quantized"
    with pytest.raises(ValueError, match=rf"pack: member 0 .*{reason}"):
        ek.pack(members)
    with pytest.raises(ValueError, match=rf"align: member 0 .*{reason}"):
        ek.align(members)


def test_streamed_files_with_another_activation_are_refused(tmp_path):
    paths = []
    for i, activation in enumerate(["relu", "tanh"]):
        paths.append(str(tmp_path / f"a{i}.keras"))
        mlp(i, activation).save(paths[-1])
    with pytest.raises(ValueError, match=r"member 1 \('a1.keras'\): layer 'dense.*' \(Dense\) has activation='tanh'"):
        ek.merge(paths, stream=True)
