"""ek.fuse and ek.unfreeze: taps, pooling, frozen backbones, fine-tuning, save/load."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from tests.conftest import make_mlp


def conv_member(seed, name):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12, 1)),
        keras.layers.Conv1D(4, 3, activation="relu", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="out"),
    ], name=name)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_fuse_trains_only_the_head_and_leaves_members_untouched(fusion, tmp_path):
    members = [conv_member(0, "a"), conv_member(1, "b")]
    before = [m.get_weights() for m in members]
    fused = ek.fuse(members, taps=["conv", 1], fusion=fusion)
    assert fused.output.shape == (None, 3)
    backbone_weights = [w.copy() for w in fused.get_layer("a_features").get_weights()]
    x = np.random.default_rng(0).normal(size=(64, 12, 1)).astype("float32")
    y = np.arange(64) % 3
    fused.compile("adam", "sparse_categorical_crossentropy")
    fused.fit(x, y, epochs=2, verbose=0)
    for a, b in zip(backbone_weights, fused.get_layer("a_features").get_weights()):
        np.testing.assert_array_equal(a, b)  # frozen: BN statistics included
    for member, weights in zip(members, before):
        for a, b in zip(weights, member.get_weights()):
            np.testing.assert_array_equal(a, b)
    path = tmp_path / "fused.keras"
    fused.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), fused.predict(x, verbose=0))


def test_spatial_taps_are_pooled_to_channels():
    fused = ek.fuse([conv_member(0, "a"), conv_member(1, "b")], taps="conv")
    concat = fused.get_layer("fusion")
    assert concat.output.shape == (None, 8)  # 4 channels per member, time axis averaged away


def test_unfreeze_last_layers_keeps_batchnorm_frozen():
    fused = ek.fuse([conv_member(0, "a"), conv_member(1, "b")], taps="flat")
    head_only = len(fused.trainable_weights)
    ek.unfreeze(fused, n_layers=2)  # conv and bn are the weighted layers up to "flat"
    backbone = fused.get_layer("a_features")
    assert backbone.get_layer("conv").trainable
    assert not backbone.get_layer("bn").trainable
    assert len(fused.trainable_weights) == head_only + 2 * 2  # conv kernel + bias, per member
    ek.unfreeze(fused, n_layers=0)
    assert len(fused.trainable_weights) == head_only


def test_custom_head_and_errors():
    members = [make_mlp(0, name="a"), make_mlp(1, name="b")]
    fused = ek.fuse(members, taps="hidden", head=keras.layers.Dense(5, name="my_head"))
    assert fused.output.shape == (None, 5)
    with pytest.raises(ValueError, match=r"tap 'nope' for member 1 \('b'\) is not a layer of it"):
        ek.fuse(members, taps=["hidden", "nope"])
    with pytest.raises(ValueError, match="tap 9 for member 0"):
        ek.fuse(members, taps=9)
    with pytest.raises(ValueError, match="taps has 1 entries but there are 2 members"):
        ek.fuse(members, taps=["hidden"])
    with pytest.raises(ValueError, match="Unknown fusion 'sum'"):
        ek.fuse(members, taps="hidden", fusion="sum")
    with pytest.raises(ValueError, match="has no fused backbones"):
        ek.unfreeze(members[0])


@pytest.mark.parametrize("task,units,activation,loss", [("binary", 1, "sigmoid", "binary_crossentropy"),
                                                        ("regression", 2, "linear", "mse")])
def test_fuse_gives_each_task_its_head_and_trains(task, units, activation, loss):
    def member(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="h"),
                                 keras.layers.Dense(units)], name=f"m{seed}")

    fused = ek.fuse([member(0), member(1)], taps="h", task=task)
    assert fused.get_layer("head").activation.__name__ == activation
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, :units] > 0).astype("float32")
    fused.compile(keras.optimizers.Adam(0.05), loss)
    history = fused.fit(x, y, epochs=15, batch_size=64, verbose=0).history["loss"]
    assert history[-1] < history[0]
    if units == 1:  # a linear unit: binary logits or a value? fuse asks, as ek.ensemble does
        with pytest.raises(ValueError, match="cannot be told; pass task="):
            ek.fuse([member(0), member(1)], taps="h")
