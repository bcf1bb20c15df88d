"""Output ensembles: several classifiers become one ``keras.Model``."""

from __future__ import annotations

import keras

from ensemblekit._validate import check_choice, check_weights
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.layers import COMBINERS

METHODS = tuple(COMBINERS)


def ensemble(models, method="mean", weights=None, name=None, output_kind=None, adapters=None,
             input_shape=None, safe_mode=True):
    """Combine classifiers into one model whose output is the ensemble's probabilities.

    All members run inside ONE functional graph: calling (or ``predict``-ing,
    or XLA-compiling) the result runs every member in a single call.

    Args:
        models: list of ``keras.Model`` or paths to ``.keras``/``.h5`` files, each
            with one input and one ``(batch, classes)`` output.
        method: ``"mean"`` (average of probabilities), ``"logit_mean"`` (softmax of
            the mean logits), ``"geometric"`` (normalised geometric mean of
            probabilities), ``"vote"`` (hard majority, ties broken by the mean
            probability) or ``"weighted"`` (weighted mean of probabilities; needs
            ``weights``).
        weights: optional non-negative per-member weights (normalised to sum to
            one); they weight any method.
        name: name of the returned model (default ``"ensemble_<method>"``).
        output_kind: what the members output: ``None`` detects a final softmax,
            ``"logits"``/``"probs"`` says it for all, or give one per member.
        adapters: optional list with one Keras layer (or ``None``) per member that
            maps the shared input to the member's input (e.g. ``Resizing``).
        input_shape: the shared input shape (default: member 0's).
        safe_mode: used when loading members from files.

    Returns:
        A ``keras.Model`` mapping the shared input to ``(batch, classes)`` probabilities.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> model = ek.ensemble(members, method="mean")
        >>> model.predict(np.zeros((2, 4)), verbose=0).shape
        (2, 3)
    """
    check_choice(method, METHODS, "method")
    members = MemberSet(models, output_kind=output_kind, adapters=adapters, input_shape=input_shape,
                      safe_mode=safe_mode)
    if method == "weighted" and weights is None:
        raise ValueError("method 'weighted' needs weights=[...], one per member.")
    member_weights = None if weights is None else check_weights(weights, len(members)).tolist()
    inputs = members.shared_input()
    combiner = COMBINERS[method](members.output_kinds, member_weights=member_weights, name=f"combine_{method}")
    outputs_tensor = combiner(members.call_all(inputs))
    return keras.Model(inputs, outputs_tensor, name=name or f"ensemble_{method}")
