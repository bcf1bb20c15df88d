"""pack, align and prune.channels on keras-hub image classifiers (ResNet, ViT) built from small configs.

The backbone is nested in the task model (``preprocessor=None``, no preset
download). ViT's composite layers (``ViTPatchingAndEmbedding``, ``ViTEncoder``)
are read through the channel graph's ``patch_embedding``/``transformer`` kinds:
the residual stream is one group across the patch embedding, every block and
the final LayerNormalization; each block's whole heads, units within a head
and MLP units are groups of their own.
"""

import functools

import keras
import keras_hub  # a test dependency (the [test] extra): a missing install fails loudly
import numpy as np
import pytest

from ensemblekit._channels import channel_graph
from ensemblekit._graph import get_arrays, weight_refs
from ensemblekit.compose import ensemble
from ensemblekit.costs import macs
from ensemblekit.merge import align
from ensemblekit.merge.permutation import permutation_spec
from ensemblekit.pack import pack, unpack
from ensemblekit.pack.layers import GroupedPatchEmbedding, GroupedTransformerEncoder
from ensemblekit.prune import channels
from tests import applications

FAMILIES = list(applications.HUB_FAMILIES)


@functools.cache
def _members(name):
    return applications.hub_member(name, 0), applications.hub_member(name, 1)


def _run(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_vit_channel_graph_couples_the_residual_stream_and_opens_heads_and_mlp_units():
    graph = channel_graph(_members("ViT")[0])
    sizes = sorted((graph.size(root), sorted(layer.name for layer in layers))
                   for root, layers in graph.openers().items() if graph.fixed(root) is None)
    # one residual stream (16) opened by the patch embedding; per block: 2 heads, 32 MLP units
    assert sizes == [(2, ["vit_encoder"]), (2, ["vit_encoder"]), (16, ["vit_patching_and_embedding"]),
                     (32, ["vit_encoder"]), (32, ["vit_encoder"])]
    encoder = next(r for r in graph.records("transformer"))
    assert graph.find(encoder.input[0]) == graph.find(graph.records("patch_embedding")[0].output[0])
    # the units within a head are permuted by align but never pruned
    spec = permutation_spec(graph.model, nested=True)
    assert sorted(spec.sizes.values()) == [2, 2, 8, 8, 8, 8, 16, 32, 32]


@pytest.mark.parametrize("name", FAMILIES)
def test_pack_equals_ensemble_unpacks_exactly_and_loads_in_safe_mode(name, tmp_path):
    members = _members(name)
    x = applications.hub_sample()
    packed = pack(list(members))
    probs = [_run(m, x) for m in members]
    assert np.abs(probs[0] - probs[1]).max() > 1e-2  # the members differ: a swapped member would show
    np.testing.assert_allclose(_run(packed, x), _run(ensemble(list(members)), x), atol=1e-5, rtol=0)
    assert not any(isinstance(layer, keras.Model) for layer in packed.layers)
    assert macs(packed) == sum(macs(m) for m in members)
    if name == "ViT":  # the composite layers have grouped forms: one einsum per product for K members
        assert {type(layer) for layer in packed.layers} >= {GroupedPatchEmbedding, GroupedTransformerEncoder}
    for original, back in zip(members, unpack(packed), strict=True):
        assert [type(layer).__name__ for layer in back.layers] == [type(layer).__name__ for layer in original.layers]
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    path = tmp_path / "packed.keras"
    packed.save(path)
    np.testing.assert_array_equal(_run(keras.saving.load_model(path), x), _run(packed, x))


@pytest.mark.parametrize("name", FAMILIES)
def test_aligned_members_predict_the_same_probabilities(name):
    members = _members(name)
    x = applications.hub_sample()
    aligned, perms = align(list(members), max_iter=3, verbose=0, return_permutations=True)
    moved = [g for g, p in perms[1].items() if not np.array_equal(p, np.arange(len(p)))]
    assert len(moved) > len(perms[1]) // 2
    original = _run(members[1], x)
    diff = np.abs(_run(aligned[1], x) - original).max()
    assert diff <= 1e-4, f"{name}: aligned member's probabilities differ by {diff:.2e}"
    # the check can fail: the first weight that moved, put back, changes the probabilities
    moved_ref, unmoved = next((a, o) for a, o in zip(weight_refs(aligned[1]), weight_refs(members[1]),
                                                     strict=True) if not np.array_equal(a.numpy(), o.numpy()))
    moved_ref.assign(unmoved.numpy())
    assert np.abs(_run(aligned[1], x) - original).max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_align_undoes_a_known_random_permutation_of_every_group(name):
    member = _members(name)[0]
    shuffled, spec, weights = applications.shuffled_copy(member)
    x = applications.hub_sample()
    np.testing.assert_allclose(_run(shuffled, x), _run(member, x), atol=1e-5, rtol=0)
    assert all(not np.array_equal(get_arrays(shuffled)[i], weights[i]) for i in spec.axes if weights[i].ndim > 1)
    aligned = align([member, shuffled], verbose=0)[1]
    for ref, got, want in zip(weight_refs(aligned), get_arrays(aligned), weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{name}: {ref.path}")


@pytest.mark.parametrize("name", FAMILIES)
def test_channels_ratio_zero_is_bit_identical(name):
    member = _members(name)[0]
    x = applications.hub_sample()
    pruned = channels(member, ratio=0.0)
    np.testing.assert_array_equal(_run(pruned, x), _run(member, x))
    assert pruned.count_params() == member.count_params()


@pytest.mark.parametrize("name", FAMILIES)
def test_channels_half_shrinks_and_saves(name, tmp_path):
    member = _members(name)[0]
    x = applications.hub_sample()
    pruned = channels(member, ratio=0.5)
    assert pruned.count_params() <= 0.6 * member.count_params()
    output = _run(pruned, x)
    assert output.shape == _run(member, x).shape and np.isfinite(output).all()
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    np.testing.assert_array_equal(_run(keras.saving.load_model(path), x), output)


def test_vit_channels_remove_whole_heads_mlp_units_and_the_stream_together():
    member = _members("ViT")[0]
    pruned = channels(member, ratio=0.5)
    backbone = next(layer for layer in pruned.layers if isinstance(layer, keras.Model))
    config = backbone.get_config()  # a ViTBackbone again, rebuilt from its own constructor arguments
    assert type(backbone).__name__ == "ViTBackbone"
    assert (config["hidden_dim"], config["num_heads"], config["mlp_dim"]) == (8, 1, 16)
    query = next(v for v in backbone.weights if v.path.endswith("mha/query/kernel"))
    assert tuple(query.shape) == (8, 1, 8)  # units within a head are kept: key_dim stays 8


def test_vit_with_average_pooling_packs_aligns_and_prunes():
    # "gap" pooling averages the tokens with keras.ops.mean over axis 1: the channels pass through
    members = [applications.hub_vit(seed, pooling="gap") for seed in (0, 1)]
    x = applications.hub_sample()
    np.testing.assert_allclose(_run(pack(members), x), _run(ensemble(members), x), atol=1e-5, rtol=0)
    aligned = align(members, max_iter=2, verbose=0)[1]
    np.testing.assert_allclose(_run(aligned, x), _run(members[1], x), atol=1e-4, rtol=0)
    assert channels(members[0], ratio=0.5).count_params() <= 0.6 * members[0].count_params()


def _keras_hub_transformer_member(seed):
    """Dense -> keras-hub's NLP ``TransformerEncoder`` (not in the layer-kind table) -> pooling -> head."""

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 8))
    hidden = keras_hub.layers.TransformerEncoder(intermediate_dim=8, num_heads=2)(keras.layers.Dense(8)(inputs))
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled), name=f"nlp_{seed}")


def test_unsupported_layer_message_names_member_layer_and_class():
    members = [_keras_hub_transformer_member(seed) for seed in (0, 1)]
    with pytest.raises(ValueError, match=r"^pack: member 0 \('nlp_0'\), layer 'transformer_encoder\w*' "
                                         r"\(TransformerEncoder\) is not supported"):
        pack(members)
    with pytest.raises(ValueError, match=r"^Model 'nlp_0': align cannot permute through layer "
                                         r"'transformer_encoder\w*' \(TransformerEncoder\): it is not a layer kind"):
        align(members, verbose=0)
    with pytest.raises(ValueError, match=r"^channels\(\): model 'nlp_0': left unpruned dense\w* \(8 channels\): "
                                         r"layer 'transformer_encoder\w*' \(TransformerEncoder\)"):
        channels(members[0], on_unsupported="raise")
