"""The record ``ek.pack`` keeps in a packed model, read in one place.

``pack`` stores in its first ``PackedOutput`` layer the members' serialized
architectures (``member_configs``) and, in the members' weighted-layer order
(``iter_layers``, nested models expanded), the name of the packed layer holding
each one's weights (``weighted_layers``). ``ek.unpack`` and
``ensemblekit.inference.unpacked_ensemble`` both rebuild the members from it
with :func:`rebuild_members`. This module sits on the shared floor, below
``inference`` and ``pack``, so it reads the record by attribute instead of
importing ``ensemblekit.pack``.
"""

from __future__ import annotations

import json

import keras

from ensemblekit._graph import iter_layers


def finalize(layer):
    """Recompute what ``layer`` derives from its weights (``Normalization``'s mean and variance)."""
    finalize_state = getattr(layer, "finalize_state", None)
    if callable(finalize_state):
        finalize_state()


def output_layers(model):
    """The layers of ``model`` that reduce packed members (``PackedOutput``: one per packed output)."""
    return [layer for layer in model.layers
            if hasattr(layer, "weighted_layers") and hasattr(layer, "member_configs")]


def unpack_record(model):
    """The one ``PackedOutput`` layer of ``model`` holding ``pack``'s record, or ``None``.

    Example:
        >>> import keras
        >>> unpack_record(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])) is None
        True
    """
    records = [layer for layer in output_layers(model) if layer.member_configs]
    return records[0] if len(records) == 1 else None


def rebuild_members(packed, record, transform=None):
    """The K members of ``packed``, rebuilt from ``record`` with exactly their packed weights.

    Args:
        packed: a model made by ``ek.pack``.
        record: its :func:`unpack_record`.
        transform: ``None``, or a function applied to each member's serialized
            config (a dict) before it is deserialized (e.g. to change dtype policies).

    Returns:
        A list of K ``keras.Model`` with the members' architectures and names.
    """
    members = []
    for index, config in enumerate(record.member_configs):
        config = json.loads(config)
        member = keras.saving.deserialize_keras_object(config if transform is None else transform(config))
        # Weighted layers in ``iter_layers`` order (nested models expanded), as ``pack`` recorded them.
        weighted = [layer for _, layer in iter_layers(member) if layer.weights]
        for layer, holder_name in zip(weighted, record.weighted_layers, strict=True):
            holder = packed.get_layer(holder_name)
            member_weights = getattr(holder, "member_weights", None)  # grouped layers: per member
            layer.set_weights(member_weights(index) if callable(member_weights) else holder.get_weights())
            finalize(layer)
        members.append(member)
    return members
