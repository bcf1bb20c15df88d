"""Preparing members for output-level composition (shared by ensemble, stack, fuse, weights)."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._graph import model_input_shape, model_output_shape
from ensemblekit._io import load_members, predict
from ensemblekit._outputs import check_output_kinds, detect_output_kind
from ensemblekit._validate import member_label


class MemberSet:
    """Validated members of one composition: models, kinds and the shared input.

    Args:
        models: list of ``keras.Model`` or paths.
        output_kind: ``None`` (detect), ``"logits"``/``"probs"``, or one per member.
        adapters: ``None`` or one Keras layer (or ``None``) per member mapping the
            shared input to that member's input.
        input_shape: the shared input shape (default: member 0's input shape).
        min_count: fewest members accepted.
        what: how errors name the composition ("an ensemble").
    """

    def __init__(self, models, output_kind=None, adapters=None, input_shape=None, min_count=2,
                 what="an ensemble", safe_mode=True):
        self.models = load_members(models, min_count=min_count, what=what, safe_mode=safe_mode)
        self.labels = [member_label(i, m) for i, m in enumerate(self.models)]
        self.input_shapes = [self._shape(model_input_shape, i) for i in range(len(self.models))]
        self.output_shapes = [self._shape(model_output_shape, i) for i in range(len(self.models))]
        self._check_outputs()
        kinds = check_output_kinds(output_kind, len(self.models))
        self.output_kinds = [k or detect_output_kind(m) for k, m in zip(kinds, self.models)]
        self.adapters = self._check_adapters(adapters)
        self.input_shape = tuple(input_shape) if input_shape is not None else self.input_shapes[0]
        self._check_inputs()

    def __len__(self):
        return len(self.models)

    @property
    def num_classes(self):
        return self.output_shapes[0][-1]

    def _shape(self, getter, index):
        try:
            return getter(self.models[index])
        except ValueError as error:
            raise ValueError(f"{self.labels[index]}: {error}") from None

    def _check_outputs(self):
        first = self.output_shapes[0]
        if len(first) != 1 or first[0] is None or first[0] < 2:
            raise ValueError(
                f"{self.labels[0]} outputs shape (None, {', '.join(map(str, first))}); members must "
                "be classifiers with output shape (batch, classes), classes >= 2."
            )
        for label, shape in zip(self.labels[1:], self.output_shapes[1:]):
            if shape != first:
                raise ValueError(
                    f"{label} outputs shape (None, {', '.join(map(str, shape))}) but "
                    f"{self.labels[0]} outputs (None, {', '.join(map(str, first))}); all members "
                    "must predict the same classes."
                )

    def _check_adapters(self, adapters):
        if adapters is None:
            return [None] * len(self.models)
        adapters = list(adapters)
        if len(adapters) != len(self.models):
            raise ValueError(f"adapters has {len(adapters)} entries but there are {len(self.models)} members.")
        for label, adapter in zip(self.labels, adapters):
            if adapter is not None and not isinstance(adapter, keras.layers.Layer):
                raise TypeError(f"adapter for {label} is a {type(adapter).__name__}; expected a Keras layer or None.")
        return adapters

    def _check_inputs(self):
        for label, shape, adapter in zip(self.labels, self.input_shapes, self.adapters):
            seen = self.input_shape
            if adapter is not None:
                try:
                    seen = tuple(adapter.compute_output_shape((None, *self.input_shape)))[1:]
                except Exception as error:
                    raise ValueError(
                        f"adapter {adapter.name!r} for {label} cannot take input shape "
                        f"{(None, *self.input_shape)}: {error}"
                    ) from None
            if not _shapes_compatible(seen, shape):
                via = f" after adapter {adapter.name!r}" if adapter is not None else ""
                hint = "" if adapter is not None else "; pass adapters=[...] (e.g. keras.layers.Resizing) to map it"
                raise ValueError(
                    f"{label} expects input shape {(None, *shape)} but the shared input is "
                    f"{(None, *seen)}{via}{hint}."
                )

    def unique_models(self):
        """Members ready to be nested in one graph: duplicate names get a wrapper.

        Keras needs distinct names for the layers of one model. A member whose
        name is taken is wrapped in a thin functional model named
        ``"<name>_<index>"``; the member itself (its name, its layers' names,
        its weights) is untouched.
        """
        seen, unique = set(), []
        for index, model in enumerate(self.models):
            if model.name in seen:
                inputs = keras.Input(self.input_shapes[index])
                model = keras.Model(inputs, model(inputs), name=f"{model.name}_{index}")
            seen.add(model.name)
            unique.append(model)
        return unique

    def call_all(self, inputs):
        """Call every member on the shared ``inputs`` tensor; return their outputs."""
        outputs = []
        for model, adapter in zip(self.unique_models(), self.adapters):
            x = adapter(inputs) if adapter is not None else inputs
            outputs.append(model(x))
        return outputs

    def shared_input(self, name="input"):
        return keras.Input(self.input_shape, name=name)

    def log_probs_model(self):
        """A model mapping x to all members' log-probabilities, ``(batch, K, classes)``."""
        from ensemblekit.compose.layers import MemberLogProbs

        inputs = self.shared_input()
        outputs = MemberLogProbs(self.output_kinds, stack_axis=1, name="member_log_probs")(self.call_all(inputs))
        return keras.Model(inputs, outputs, name="member_log_probs")

    def predict_log_probs(self, x, batch_size=256):
        """All members' log-probabilities on ``x`` in one compiled pass: ``(n, K, classes)``."""
        return np.asarray(predict(self.log_probs_model(), x, batch_size), dtype="float64")


def _shapes_compatible(actual, expected):
    if len(actual) != len(expected):
        return False
    return all(e is None or a is None or a == e for a, e in zip(actual, expected))
