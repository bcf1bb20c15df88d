"""Feature fusion: tap layers of several backbones, fuse, and put a new head on top."""

from __future__ import annotations

import keras

from ensemblekit._validate import check_choice
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.layers import GatedFusion, PoolFeatures

FUSIONS = ("concat", "gated")


# The default head of each task: a Dense layer with this activation.
HEAD_ACTIVATIONS = {"multiclass": "softmax", "binary": "sigmoid", "multilabel": "sigmoid", "regression": None}


def _tap_layer(model, tap, label):
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(tap, bool) or not isinstance(tap, (str, int)):
        raise TypeError(f"tap for {label} must be a layer name or index, got {type(tap).__name__}.")
    if isinstance(tap, int):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        if not -len(layers) <= tap < len(layers):
            raise ValueError(f"tap {tap} for {label} is out of range: it has {len(layers)} layers {names}.")
        return layers[tap]
    if tap not in names:
        raise ValueError(f"tap {tap!r} for {label} is not a layer of it; its layers are {names}.")
    return model.get_layer(tap)


def _copy(model):
    """A copy of ``model`` with the same layer names and weights (the user's model is untouched)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def fuse(models, taps, fusion="concat", head=None, freeze=True, units=128, num_classes=None,
         name=None, task=None):
    """Fuse the features of several backbones and put a new trainable head on top.

    Each member is copied (your models are never modified); the output of its
    ``taps`` layer is taken, spatial axes are averaged away (``PoolFeatures``),
    and the features are fused by concatenation or a learned gate. The result
    is uncompiled: compile and fit it to train the head, then optionally call
    ``ek.unfreeze`` and fit again with a small learning rate.

    Args:
        models: list of backbones (models or paths), one shared input shape.
        taps: one layer name or index per member (or one for all) whose output
            is the member's feature.
        fusion: ``"concat"`` or ``"gated"`` (``GatedFusion``: per-member
            projections to ``units`` mixed by input-dependent softmax gates).
        head: ``None`` for the members' task's head — ``Dense(classes, softmax)``
            (multiclass), ``Dense(1, sigmoid)`` (binary), ``Dense(labels, sigmoid)``
            (multilabel) or a linear ``Dense(values)`` (regression) — or a Keras
            layer/model applied to the fused features.
        freeze: make the backbones non-trainable (BatchNorm in inference mode).
        units: width of the gated fusion.
        num_classes: units of the default head (default: the members' output size).
        name: name of the returned model.
        task: the members' task as in ``ek.ensemble`` (``None`` detects it; linear
            ``(batch, 1)`` outputs need ``"binary"`` or ``"regression"``). It picks the
            default head; compile with the task's loss.

    Returns:
        An uncompiled ``keras.Model``; backbones are nested models named
        ``"<member>_features"``.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
        ...                         keras.layers.Dense(3)]) for _ in range(2)]
        >>> fused = ek.fuse(ms, taps="h")
        >>> fused.predict(np.zeros((2, 4)), verbose=0).shape
        (2, 3)
        >>> regressors = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
        ...                                 keras.layers.Dense(1)]) for _ in range(2)]
        >>> ek.fuse(regressors, taps="h", task="regression").get_layer("head").activation.__name__
        'linear'
    """
    check_choice(fusion, FUSIONS, "fusion")
    members = MemberSet(models, what="fuse", task=task)
    members.require_single_output(tuple(HEAD_ACTIVATIONS))
    if isinstance(taps, (str, int)):
        taps = [taps] * len(members)
    taps = list(taps)
    if len(taps) != len(members):
        raise ValueError(f"taps has {len(taps)} entries but there are {len(members)} members.")

    inputs = members.shared_input()
    features, used = [], set()
    for index, (model, tap, label) in enumerate(zip(members.models, taps, members.labels)):
        _tap_layer(model, tap, label)  # validate against the user's model
        copy = _copy(model)
        tapped = _tap_layer(copy, tap, label)
        backbone_name = f"{model.name}_features"
        if backbone_name in used:
            backbone_name = f"{model.name}_{index}_features"
        used.add(backbone_name)
        backbone = keras.Model(copy.inputs, tapped.output, name=backbone_name)
        backbone.trainable = not freeze
        features.append(PoolFeatures(name=f"pool_{index}")(backbone(inputs)))

    if fusion == "concat":
        fused = keras.layers.Concatenate(name="fusion")(features)
    else:
        fused = GatedFusion(units, name="fusion")(features)
    if head is None:
        head = keras.layers.Dense(num_classes or members.num_classes,
                                  activation=HEAD_ACTIVATIONS[members.task], name="head")
    elif not isinstance(head, keras.layers.Layer):
        raise TypeError(f"head must be a Keras layer or model, got {type(head).__name__}.")
    return keras.Model(inputs, head(fused), name=name or f"fuse_{fusion}")


def backbones(model):
    """The backbone sub-models of a model made by ``fuse``."""
    return [layer for layer in model.layers
            if isinstance(layer, keras.Model) and layer.name.endswith("_features")]


def unfreeze(model, n_layers=None, keep_batchnorm_frozen=True):
    """Make the last ``n_layers`` weighted layers of each fused backbone trainable.

    The fine-tune stage after training a head on frozen backbones. Recompile
    the model afterwards (Keras fixes the trainable set at ``compile``), and
    use a small learning rate.

    Args:
        model: a model returned by ``fuse``.
        n_layers: how many weighted layers to unfreeze, counted from each
            backbone's end (``None``: all).
        keep_batchnorm_frozen: leave BatchNormalization layers in inference
            mode (the usual choice when fine-tuning on small data).

    Returns:
        ``model`` itself, for chaining.

    Example:
        >>> import keras
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
        ...                         keras.layers.Dense(3)]) for _ in range(2)]
        >>> fused = ek.unfreeze(ek.fuse(ms, taps="h"), n_layers=1)
        >>> len(fused.trainable_weights) > 2
        True
    """
    found = backbones(model)
    if not found:
        raise ValueError(f"Model {model.name!r} has no fused backbones; unfreeze takes a model made by ek.fuse.")
    if n_layers is not None and (not isinstance(n_layers, int) or n_layers < 0):
        raise ValueError(f"n_layers must be a non-negative integer or None, got {n_layers!r}.")
    for backbone in found:
        backbone.trainable = True
        weighted = [layer for layer in backbone.layers if layer.weights]
        keep = weighted if n_layers is None else weighted[len(weighted) - n_layers:] if n_layers else []
        for layer in weighted:
            frozen_bn = keep_batchnorm_frozen and isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = layer in keep and not frozen_bn
    return model
