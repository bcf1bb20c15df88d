"""Preparing members for output-level composition (shared by ensemble, stack, fuse, weights)."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._data import collect
from ensemblekit._io import load_members
from ensemblekit._outputs import (
    check_output_kinds,
    check_task,
    detect_output_kind,
    detect_task,
    input_names,
    output_names,
    structured_inputs,
)
from ensemblekit._tasks import (
    check_variance_kind,
    check_variance_member,
    paired_task,
    variance_pairs,
)
from ensemblekit._validate import member_label


class MemberSet:
    """Validated members of one composition: models, tasks, kinds and the shared inputs.

    Members may have one input or several (list or dict inputs, matched by
    name when every member names them alike, else by position) and one output
    or several (matched the same way). Each output has one task for all
    members (detected, or given with ``task=``).

    Args:
        models: list of ``keras.Model`` or paths.
        output_kind: ``None`` (detect), ``"logits"``/``"probs"``, or one per member.
        adapters: ``None`` or one Keras layer (or ``None``) per member mapping the
            shared input to that member's input (single-input members only).
        input_shape: the shared input shape (default: member 0's input shape).
        min_count: fewest members accepted.
        what: how errors name the composition ("an ensemble").
        task: ``None``/``"auto"`` (detect), one task for every output, or
            ``{output name: task}``.
        variance: ``None``, or which outputs are the variances of which (regression)
            outputs (``ensemblekit._tasks.variance_pairs``); ``variance_pairs`` holds
            ``{mean output index: variance output index}``.
        variance_kind: what the variance outputs hold (``ensemblekit._tasks.VARIANCE_KINDS``).
    """

    def __init__(self, models, output_kind=None, adapters=None, input_shape=None, min_count=2,
                 what="an ensemble", safe_mode=True, task=None, variance=None, variance_kind="variance"):
        self.models = load_members(models, min_count=min_count, what=what, safe_mode=safe_mode)
        self.labels = [member_label(i, m) for i, m in enumerate(self.models)]
        self.what = what
        for label, model in zip(self.labels, self.models):
            if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
                raise ValueError(
                    f"{label} is not built (no inputs/outputs); call it on data or give it a "
                    "keras.Input first."
                )
        self.input_names = input_names(self.models[0])
        self.input_orders = [self._match(i, input_names(m), self.input_names, "input")
                             for i, m in enumerate(self.models)]
        self.output_names = output_names(self.models[0])
        self.output_orders = [self._match(i, output_names(m), self.output_names, "output")
                              for i, m in enumerate(self.models)]
        self.input_shapes = [tuple(m.inputs[order[0]].shape[1:]) for m, order in zip(self.models, self.input_orders)]
        self.output_shapes = [tuple(m.outputs[order[0]].shape[1:]) for m, order in zip(self.models, self.output_orders)]
        kinds = check_output_kinds(output_kind, len(self.models))
        self.variance_pairs = variance_pairs(variance, self.output_names)
        self.variance_kind = check_variance_kind(variance_kind)
        self.tasks = self._tasks(task)
        self.kinds_by_output = [
            [k or detect_output_kind(m, order[j]) for k, m, order in zip(kinds, self.models, self.output_orders)]
            for j in range(len(self.output_names))
        ]
        self.output_kinds = self.kinds_by_output[0]
        self._check_outputs()
        for label, model, order in zip(self.labels, self.models, self.output_orders):
            check_variance_member(model, label, order, self.variance_pairs, self.output_names, variance_kind)
        self.adapters = self._check_adapters(adapters)
        self.input_shape = tuple(input_shape) if input_shape is not None else self.input_shapes[0]
        self._check_inputs()

    def __len__(self):
        return len(self.models)

    @property
    def num_classes(self):
        return self.output_shapes[0][-1]

    @property
    def task(self):
        """The task of the (first) output."""
        return self.tasks[0]

    @property
    def single_io(self):
        return len(self.input_names) == 1 and len(self.output_names) == 1

    @property
    def single_output(self):
        """One output (any number of inputs: a dict of token ids and masks, say)."""
        return len(self.output_names) == 1

    def _match(self, index, names, reference, what):
        """Member ``index``'s positions of the shared ``reference`` inputs/outputs (by name, else position)."""
        if len(names) != len(reference):
            raise ValueError(
                f"{self.labels[index]} has {len(names)} {what}s {names} but {self.labels[0]} has "
                f"{len(reference)} {reference}; members must have the same {what}s."
            )
        if sorted(names) == sorted(reference):
            return [names.index(name) for name in reference]
        return list(range(len(reference)))

    @property
    def predicted_outputs(self):
        """Indices of the outputs that are predictions (not the variance of another output)."""
        return [j for j in range(len(self.output_names)) if j not in self.variance_pairs.values()]

    def _tasks(self, task):
        given = check_task(task, self.output_names)
        paired = {*self.variance_pairs, *self.variance_pairs.values()}
        tasks = []
        for j, (name, value) in enumerate(zip(self.output_names, given)):
            if j in paired:  # a mean with a variance is a regression output, and so is its variance
                value = paired_task(value, name)
            if value is None:
                found = [detect_task(m, order[j], label) for m, order, label
                         in zip(self.models, self.output_orders, self.labels)]
                value = found[0]
                for label, other in zip(self.labels[1:], found[1:]):
                    if other != value:
                        raise ValueError(
                            f"output {name!r}: {self.labels[0]} is a {value} model but {label} is "
                            f"{other}; members of one composition must share the task (or pass task=)."
                        )
            tasks.append(value)
        return tasks

    def _check_outputs(self):
        for j, (name, task) in enumerate(zip(self.output_names, self.tasks)):
            shapes = [tuple(m.outputs[order[j]].shape[1:]) for m, order in zip(self.models, self.output_orders)]
            first = shapes[0]
            described = f"(None, {', '.join(map(str, first))})"
            where = "" if len(self.output_names) == 1 else f" (output {name!r})"
            if not first or first[-1] is None:
                raise ValueError(
                    f"{self.labels[0]} outputs shape {described}{where}; members must output "
                    "(batch, ..., units) with a known last axis."
                )
            if task == "multiclass" and first[-1] < 2:
                raise ValueError(
                    f"{self.labels[0]} outputs shape {described}{where}; members must be classifiers "
                    "with output shape (batch, classes), classes >= 2, for task 'multiclass' "
                    "(one sigmoid unit is task='binary'; values are task='regression')."
                )
            if task == "binary" and first[-1] != 1:
                raise ValueError(
                    f"{self.labels[0]} outputs shape {described}{where}; task 'binary' needs one unit "
                    "(several independent units are task='multilabel')."
                )
            for label, shape in zip(self.labels[1:], shapes[1:]):
                if shape != first:
                    raise ValueError(
                        f"{label} outputs shape (None, {', '.join(map(str, shape))}){where} but "
                        f"{self.labels[0]} outputs {described}; all members must predict the same "
                        "classes (the same output shape)."
                    )

    def require_single_classifier(self):
        """Raise unless the members have one input and one multiclass output (what ``what`` supports)."""
        self.require_single_output(("multiclass",))

    def require_single_output(self, tasks, several_inputs=False):
        """Raise unless the members have one input (or, with ``several_inputs``, any inputs) and one
        ``(batch, units)`` output of one of ``tasks``."""
        if not (self.single_output if several_inputs else self.single_io):
            raise ValueError(
                f"{self.what} supports members with one input and one output; {self.labels[0]} has "
                f"inputs {self.input_names} and outputs {self.output_names} (use ek.ensemble for "
                "several inputs or outputs)."
            )
        if self.task not in tasks:
            raise ValueError(
                f"{self.what} supports {' and '.join(tasks)} members; {self.labels[0]}'s output is {self.task} "
                "(use ek.ensemble(..., task=...) for other tasks)."
            )
        if len(self.output_shapes[0]) != 1:
            raise ValueError(
                f"{self.what} supports (batch, units) outputs; {self.labels[0]} outputs "
                f"(None, {', '.join(map(str, self.output_shapes[0]))}) (dense outputs: use ek.ensemble)."
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
        if len(self.input_names) > 1:
            return self._check_named_inputs()
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

    def _check_named_inputs(self):
        if any(adapter is not None for adapter in self.adapters):
            raise ValueError(f"adapters are supported for members with one input; {self.labels[0]} has "
                             f"inputs {self.input_names}.")
        reference = [tuple(t.shape[1:]) for t in self.models[0].inputs]
        for label, model, order in zip(self.labels[1:], self.models[1:], self.input_orders[1:]):
            for name, shape, position in zip(self.input_names, reference, order):
                actual = tuple(model.inputs[position].shape[1:])
                if not _shapes_compatible(actual, shape):
                    raise ValueError(
                        f"{label} expects input {name!r} of shape {(None, *actual)} but "
                        f"{self.labels[0]} takes {(None, *shape)}; members must share their inputs."
                    )

    def unique_models(self):
        """Members ready to be nested in one graph: duplicate names get a wrapper.

        Keras needs distinct names for the layers of one model. A member whose
        name is taken is wrapped in a thin functional model named
        ``"<name>_<index>"``; the member itself (its name, its layers' names,
        its weights) is untouched. The same model object given more than once is
        called more than once (a shared layer: it saves and loads as one).
        """
        seen, objects, unique = set(), set(), []
        for index, model in enumerate(self.models):
            if id(model) in objects:  # the same model again (ek.tta's views): one shared layer
                unique.append(model)
                continue
            objects.add(id(model))
            if model.name in seen:
                inputs = fresh_inputs(model)
                model = keras.Model(inputs, model(inputs), name=f"{model.name}_{index}")
            seen.add(model.name)
            unique.append(model)
        return unique

    def call_all(self, inputs):
        """Call every single-output member on the shared ``inputs``; return their outputs."""
        return [outputs[0] for outputs in self.call_outputs(inputs)]

    def call_outputs(self, inputs):
        """Call every member on the shared ``inputs``; per member, its outputs in the shared order.

        ``inputs`` is one tensor (one input) or ``{name: tensor}`` as made by
        ``shared_input``.
        """
        results = []
        for index, (model, adapter) in enumerate(zip(self.unique_models(), self.adapters)):
            if len(self.input_names) == 1:
                x = inputs[self.input_names[0]] if isinstance(inputs, dict) else inputs
                outputs = model(adapter(x) if adapter is not None else x)
            else:
                outputs = model(self._member_inputs(index, inputs))
            flat = keras.tree.flatten(outputs)
            results.append([flat[position] for position in self.output_orders[index]])
        return results

    def _member_inputs(self, index, inputs):
        """The shared ``{name: tensor}`` ``inputs`` as member ``index`` takes them (its order, its structure)."""
        by_position = sorted(zip(self.input_orders[index], self.input_names))
        return structured_inputs(self.models[index], [inputs[name] for _, name in by_position])

    def shared_input(self, name="input"):
        """The composition's input: one ``keras.Input``, or ``{name: keras.Input}`` for several."""
        if len(self.input_names) == 1:
            return keras.Input(self.input_shape, name=name)
        return {n: keras.Input(t.shape[1:], dtype=t.dtype, name=n)
                for n, t in zip(self.input_names, _ordered_inputs(self.models[0], self.input_orders[0]))}

    def predict_stacked(self, x, output=0, batch_size=256, task=None):
        """All members' output ``output`` on ``x`` in canonical form (``ensemblekit._tasks``): ``(n, K, ...)``.

        Log-probabilities (multiclass), logits (binary/multilabel) or values
        (regression), for the output's task or the ``task`` given.
        """
        return self.collect_stacked(x, output=output, batch_size=batch_size, task=task)[0]

    def collect_stacked(self, x, y=None, sample_weight=None, *, output=0, batch_size=None, steps=None,
                        task=None, function="predict", needs_labels=False):
        """``(stacked, collected)``: :meth:`predict_stacked` on any data Keras reads, in one
        pass that also collects the labels (``collected.y``) and sample weights
        (``ensemblekit._data.collect``)."""
        from ensemblekit._tasks import MemberStack

        inputs = self.shared_input()
        per_member = [outs[output] for outs in self.call_outputs(inputs)]
        stacked = MemberStack(task or self.tasks[output], self.kinds_by_output[output],
                              name="member_stack")(per_member)
        data = collect([keras.Model(inputs, stacked)], x, y, sample_weight, batch_size=batch_size,
                       steps=steps, function=function, needs_labels=needs_labels)
        return np.asarray(data.outputs[0], dtype="float64"), data

    def predict_log_probs(self, x, batch_size=256):
        """All members' log-probabilities on ``x`` in one compiled pass: ``(n, K, classes)``."""
        return self.predict_stacked(x, batch_size=batch_size, task="multiclass")


def fresh_inputs(model):
    """New ``keras.Input`` tensors in ``model``'s input structure (same names, shapes, dtypes)."""
    return keras.tree.map_structure(lambda t: keras.Input(t.shape[1:], dtype=t.dtype, name=t.name),
                                    _inputs_struct(model))


def _inputs_struct(model):
    """How ``model`` takes its inputs: a dict, a list, or one tensor (Sequential models)."""
    struct = getattr(model, "_inputs_struct", None)
    return struct if struct is not None else model.inputs[0]


def _ordered_inputs(model, order):
    return [model.inputs[position] for position in order]


def _shapes_compatible(actual, expected):
    if len(actual) != len(expected):
        return False
    return all(e is None or a is None or a == e for a, e in zip(actual, expected))
