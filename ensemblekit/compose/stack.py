"""Stacking: a meta-learner trained on the members' out-of-fold predictions."""

from __future__ import annotations

import keras
import numpy as np

from ensemblekit._data import is_dataset, refuse_sample_weight
from ensemblekit._tasks import MemberStack
from ensemblekit._validate import check_choice, check_targets
from ensemblekit.compose._members import MemberSet
from ensemblekit.compose.layers import MemberLogProbs
from ensemblekit.metrics import check_finite_members

META_HEADS = ("logistic", "mlp")
STACK_TASKS = ("multiclass", "binary", "regression")
# Per task: the meta-learner's output activation and its training loss.
_HEAD = {"multiclass": ("softmax", "sparse_categorical_crossentropy"),
         "binary": ("sigmoid", "binary_crossentropy"),
         "regression": (None, "mean_squared_error")}


def _meta_head(meta, n_features, n_classes, n_members, seed, task="multiclass"):
    """A fresh meta-learner mapping ``(batch, n_features)`` to the task's prediction.

    The ``"logistic"`` head (softmax, sigmoid or linear regression by task)
    starts AT the members' combination (kernel = identity / K on each member's
    canonical output: the geometric mean of probabilities, the mean logit, or
    the mean value; zero elsewhere), so training with early stopping can only
    move away from it where held-out folds say it helps.
    """
    if isinstance(meta, keras.Model):
        clone = keras.models.clone_model(meta)
        if not clone.built:
            clone.build((None, n_features))
        return clone
    init = keras.initializers.GlorotUniform(seed=seed)
    layers = [keras.Input((n_features,))]
    if meta == "mlp":
        layers.append(keras.layers.Dense(64, activation="relu", kernel_initializer=init))
    layers.append(keras.layers.Dense(n_classes, activation=_HEAD[task][0], kernel_initializer=init))
    head = keras.Sequential(layers, name="meta")
    if meta == "logistic":
        kernel = np.zeros((n_features, n_classes), dtype="float32")
        kernel[: n_members * n_classes] = np.tile(np.eye(n_classes), (n_members, 1)) / n_members
        head.layers[-1].set_weights([kernel, np.zeros(n_classes, dtype="float32")])
    return head


def _fit_meta(meta, features, y, shape, epochs, batch_size, seed, validation=None, task="multiclass"):
    """Train a meta-learner; return it and the best epoch on ``validation`` (0 = untrained)."""
    head = _meta_head(meta, features.shape[1], *shape, seed, task=task)
    if validation is None:
        _fit_head(head, _HEAD[task][1], features, y, epochs, batch_size, seed)
        return head, epochs
    stopper = _ValidationStopper(validation, task, patience=10)
    stopper.set_model(head)
    _fit_head(head, _HEAD[task][1], features, y, epochs, batch_size, seed, callbacks=[stopper])
    return head, int(np.argmin(stopper.losses))


def _replicated(model):
    """Whether ``model`` trains under a ``tf.distribute`` strategy with several replicas."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and strategy.num_replicas_in_sync > 1


def _fit_head(head, loss, features, y, epochs, batch_size, seed, callbacks=None):
    """Compile ``head`` (Adam 1e-3, ``loss``) and fit it for ``epochs`` passes over ``(features, y)``,
    the rows in :func:`_epoch_orders` (none for ``epochs=0``).

    Arrays get a new input pipeline every epoch, which on a meta-learner's few
    hundred rows costs more than the epoch's steps; so the batches come from one
    endless generator that Keras keeps for the whole fit, an epoch's steps in one
    call (``steps_per_execution``). Under a ``tf.distribute`` strategy with several
    replicas (which cannot split a generator's batches), one ``fit`` per epoch on
    the rows in the same order, so both compute the same steps.
    """
    replicated, steps = _replicated(head), -(-len(features) // batch_size)
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, steps_per_execution=1 if replicated else steps)
    if not epochs:
        return
    features, y = np.asarray(features, "float32"), np.asarray(y)
    orders = _epoch_orders(len(features), seed)
    if replicated:
        for epoch in range(epochs):
            order = next(orders)
            head.fit(features[order], y[order], batch_size=batch_size, initial_epoch=epoch, epochs=epoch + 1,
                     shuffle=False, verbose=0, callbacks=callbacks)
            if head.stop_training:
                return
        return
    batches = ((features[order[start:start + batch_size]], y[order[start:start + batch_size]])
               for order in orders for start in range(0, len(order), batch_size))
    head.fit(batches, steps_per_epoch=steps, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def _epoch_orders(n_rows, seed):
    """Endless row orders, a fresh seeded permutation of ``range(n_rows)`` per epoch."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.permutation(n_rows)


class _ValidationStopper(keras.callbacks.Callback):
    """Early stopping on the validation loss, computed in one direct call per epoch (:func:`_mean_loss`).

    ``losses[0]`` is the untrained head's, ``losses[e]`` the loss after epoch ``e``.
    Keras' own ``validation_data`` would build an evaluation dataset every epoch,
    which on a meta-learner's few hundred rows costs more than the epoch.
    """

    def __init__(self, validation, task, patience):
        super().__init__()
        self.validation, self.task, self.patience = validation, task, patience
        self.losses = []

    def set_model(self, model):
        super().set_model(model)
        if not self.losses:
            self.losses.append(_mean_loss(model, *self.validation, task=self.task))

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(_mean_loss(self.model, *self.validation, task=self.task))
        if len(self.losses) - 1 - int(np.argmin(self.losses)) >= self.patience:
            self.model.stop_training = True


def _mean_loss(head, features, y, task="multiclass"):
    """Mean cross-entropy of ``head`` on ``(features, y)`` in one direct call.

    Not ``head.evaluate``: under a ``tf.distribute`` strategy, Keras fails on a
    dataset that is ONE batch split unevenly across replicas (an AddN shape
    error), which ``evaluate(batch_size=1024)`` on an odd-sized fold always was.
    """
    out = head(keras.ops.convert_to_tensor(features, "float32"), training=False)
    loss = keras.losses.get(_HEAD[task][1])
    return float(keras.ops.mean(loss(keras.ops.convert_to_tensor(y, "float32" if task != "multiclass" else None), out)))


def _check_stackable(members):
    if not members.single_output or len(members.output_shapes[0]) != 1 or members.task not in STACK_TASKS:
        raise ValueError(
            f"stack supports members with one (batch, units) output of task "
            f"{', '.join(map(repr, STACK_TASKS))}; {members.labels[0]} has inputs {members.input_names}, "
            f"outputs {members.output_names} of shape (None, {', '.join(map(str, members.output_shapes[0]))}) "
            f"and task {members.task!r} (use ek.ensemble for the others)."
        )
    return members.task


def _targets(y, rows, units, task):
    """Labels (multiclass), 0/1 floats ``(n, 1)`` (binary: the sigmoid head's targets) or values."""
    targets = check_targets(y, rows, (units,), task)
    return targets.astype("float32").reshape(rows, 1) if task == "binary" else targets


def _folds(n_samples, cv, seed):
    order = np.random.default_rng(seed).permutation(n_samples)
    return np.array_split(order, cv)


def _refit_member(model, kind, x, y, epochs, batch_size):
    """A copy of ``model`` trained from scratch on ``(x, y)`` (for ``refit_members=True``)."""
    clone = keras.models.clone_model(model)
    clone.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=kind == "logits"))
    clone.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return clone


def _meta_features(stacked, x, passthrough):
    """The meta-learner's inputs: the members' canonical outputs ``stacked`` (``(n, K, units)``), flattened."""
    features = stacked.reshape(stacked.shape[0], -1)
    if passthrough:
        features = np.concatenate([features, np.asarray(x, "float64").reshape(len(x), -1)], axis=1)
    return features


def _refit_out_of_fold(members, x, y, folds, passthrough, member_epochs, batch_size, progress):
    """Out-of-fold meta-features from fresh member copies per fold, and copies refit on all of x."""

    def refit(rows):
        return MemberSet([_refit_member(m, k, x[rows], y[rows], member_epochs, batch_size)
                        for m, k in zip(members.models, members.output_kinds)],
                       output_kind=members.output_kinds, what="stack")

    features = None
    for held_out in folds:
        fold_members = refit(np.setdiff1d(np.arange(len(x)), held_out))
        fold_features = _meta_features(fold_members.predict_stacked(x[held_out]), x[held_out], passthrough)
        if features is None:
            features = np.zeros((len(x), fold_features.shape[1]))
        features[held_out] = fold_features
        progress.add(2)
    refit_members = refit(np.arange(len(x)))
    progress.add(1)
    return features, refit_members


def stack(models, x, y=None, meta="logistic", cv=5, passthrough=False, refit_members=False,
          member_epochs=10, epochs=100, batch_size=64, output_kind=None, seed=0, name=None,
          verbose=1, task=None):
    """Stacked generalisation (Wolpert, 1992): a Keras meta-learner over the members.

    What is done: the meta-features are the members' log-probabilities
    (concatenated; plus the flattened input with ``passthrough=True``); for
    binary members their logits, for regressors their values, and the
    meta-learner ends in a sigmoid (binary cross-entropy) or is linear (MSE).

    * ``refit_members=False`` (default): members are NOT retrained. Their
      predictions on ``x`` are out-of-fold only if ``x`` was held out from the
      members' training — pass a validation split, never the members' training
      data. ``cv`` folds are used to fit the meta-learner with early stopping
      on each held-out fold; the final meta-learner is refit on all of ``x``
      for the median best epoch count (possibly zero: the ``"logistic"``
      head starts at the geometric-mean ensemble and stays there unless the
      held-out folds prefer otherwise).
    * ``refit_members=True``: for each of the ``cv`` folds, a fresh copy of
      every member (same architecture, new weights) is trained for
      ``member_epochs`` on the other folds and predicts the held-out fold
      (scikit-learn's ``StackingClassifier`` scheme); the returned model holds
      copies refit on all of ``x``.

    Args:
        models: list of members (models or paths).
        x: data for the meta-learner, held out from the members' training: anything
            ``model.predict`` accepts (arrays, a ``tf.data.Dataset`` of ``(x, y)``, a
            ``keras.utils.PyDataset``, a generator), read ONCE: the members' predictions
            and the labels are collected in one pass and the folds split them by index.
            ``passthrough=True`` and ``refit_members=True`` need arrays. Rows on which a
            member's outputs are NaN or inf are refused (``ValueError`` naming the member).
        y: labels as integers or one-hot (``None`` when ``x`` yields them).
        meta: ``"logistic"`` (softmax regression), ``"mlp"`` (one hidden layer
            of 64) or any ``keras.Model`` taking ``(batch, features)`` to
            probabilities (it is cloned; its weights are not used).
        cv: number of folds (>= 2).
        passthrough: also feed the raw input to the meta-learner.
        refit_members, member_epochs: see above.
        epochs, batch_size: meta-learner training.
        output_kind: what members output (``None`` detects a final softmax).
        seed: fold split and meta-learner initialisation.
        name: name of the returned model.
        verbose: ``1`` shows a progress bar over the folds (and member refits),
            ``0`` is silent.
        task: ``"multiclass"``, ``"binary"`` or ``"regression"`` (``None`` detects it);
            members with one input and one ``(batch, units)`` output.

    Returns:
        A ``keras.Model``: input -> members -> meta-learner -> probabilities,
        one graph. ``model.get_layer("meta")`` is the trained meta-learner.

    Example:
        >>> import keras, numpy as np
        >>> import ensemblekit as ek
        >>> ms = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
        >>> x, y = np.random.rand(40, 4), np.arange(40) % 3
        >>> ek.stack(ms, x, y, cv=2, epochs=2, verbose=0).predict(x[:2], verbose=0).shape
        (2, 3)
    """
    members = MemberSet(models, output_kind=output_kind, what="stack", task=task)
    task = _check_stackable(members)
    if refit_members and task != "multiclass":
        raise ValueError(f"refit_members=True retrains members with a cross-entropy loss; it supports "
                         f"multiclass members, not {task} (pass held-out x instead).")
    if (passthrough or refit_members) and len(members.input_names) != 1:
        raise ValueError(f"stack: passthrough=True and refit_members=True support members with one "
                         f"input; {members.labels[0]} has {len(members.input_names)} inputs "
                         f"{members.input_names}.")
    if is_dataset(x) and (passthrough or refit_members):
        raise ValueError(
            f"stack: x is a {type(x).__name__}; passthrough=True and refit_members=True train on the "
            "inputs themselves, so they need x as arrays. With a dataset, stack fits its "
            "meta-learner on the members' predictions (passthrough=False, refit_members=False)."
        )
    if not isinstance(meta, keras.Model):
        check_choice(meta, META_HEADS, "meta")
    # One pass: the members' predictions and the labels, aligned; the folds split them by index.
    stacked, data = members.collect_stacked(x, y, function="stack", needs_labels=True)
    refuse_sample_weight(data, "stack")
    rows = data.rows
    y = _targets(data.y, rows, members.num_classes, task)
    if not isinstance(cv, (int, np.integer)) or cv < 2 or cv > rows:
        raise ValueError(f"cv must be an integer between 2 and the number of samples ({rows}), got {cv!r}.")
    folds = _folds(rows, cv, seed)
    steps = cv * (3 if refit_members else 1) + (1 if refit_members else 0)
    progress = keras.utils.Progbar(steps, unit_name="step", verbose=verbose)
    check_finite_members(members.models, data, [stacked[:, k] for k in range(len(members))], "stack", "x",
                         members.labels)
    if not is_dataset(x):
        x = np.asarray(x)
    if refit_members:
        features, members = _refit_out_of_fold(members, x, y, folds, passthrough, member_epochs,
                                               batch_size, progress)
    else:
        features = _meta_features(stacked, x, passthrough)

    shape = (members.num_classes, len(members))
    best_epochs = []
    for held_out in folds:
        train = np.setdiff1d(np.arange(rows), held_out)
        _, best = _fit_meta(meta, features[train], y[train], shape, epochs, batch_size, seed,
                            validation=(features[held_out], y[held_out]), task=task)
        best_epochs.append(best)
        progress.add(1)
    head, _ = _fit_meta(meta, features, y, shape, int(np.median(best_epochs)), batch_size, seed, task=task)
    head.name = "meta"

    inputs = members.shared_input()
    if task == "multiclass":  # the 0.1 layer, so saved stacks keep their layout
        meta_input = MemberLogProbs(members.output_kinds, name="member_log_probs")(members.call_all(inputs))
    else:
        stacked = MemberStack(task, members.output_kinds, name="member_outputs")(members.call_all(inputs))
        meta_input = keras.layers.Flatten(name="member_features")(stacked)
    if passthrough:
        flat = keras.layers.Flatten(name="passthrough")(inputs)
        meta_input = keras.layers.Concatenate(name="meta_features")([meta_input, flat])
    return keras.Model(inputs, head(meta_input), name=name or "stack")
