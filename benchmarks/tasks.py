"""Every kind of member: binary, regression and OOD detection with ``ek.ensemble(..., uncertainty=True)``.

Run: ``python -m benchmarks.tasks [--quick]`` (about 4 minutes on 2 CPU cores; ``--quick``: 1 minute).
Writes ``benchmarks/results/tasks.json`` and ``tasks.md`` (``--quick``: ``tasks_quick.*``).

Members are trained as deep ensembles are (Lakshminarayanan et al., 2017): one
architecture per task (an MLP with two hidden layers of 64; the demo's CNN for
``mnist1d_cnn_ood``), member ``i`` seeded ``seed + i``
(initial weights and its own order of the training rows), all training rows,
Adam, early stopping on an inner validation split (each member keeps its best
validation epoch). Inputs are standardised with the training rows' statistics.
Nothing is tuned on held-out rows: early stopping, calibration (``ek.calibrate``),
the choice of "member chosen on validation" and of the ensemble's method use the
inner validation split.

Every task is scored by K-fold cross-validation (5 folds, fixed seed; stratified
for classifiers): in each fold the members (seeds ``seed..seed+K-1``, the same in
every fold) train on the other folds less a 20% inner validation split, and predict
the held-out fold. Out-of-fold predictions are pooled over all rows, so a member
index's score is the mean of K trainings, not one lucky seed. The oracle "best
member" is the member index with the lowest pooled NLL.

- ``breast_cancer`` (binary, 569 rows) and ``mnist1d_ood`` / ``mnist1d_cnn_ood``
  (multiclass: mnist1d's classes 0-4, its standard train and test rows together,
  2500 rows): members, the member chosen on validation (per fold), the mean of
  probabilities and the mean of logits (``method="logit_mean"``), and the ensemble
  whose method has the lower validation NLL in that fold -- "the ensemble" of the
  goals -- compared on the pooled metrics of ``ensemblekit.metrics`` (binary:
  accuracy, AUROC, NLL, Brier, ECE). mnist1d (Greydanus, 2020; generated locally):
  the MLP members see the 40 values as a vector (about 60% accurate), the CNN members
  are the demo's Conv1D stack (``ensemblekit.demo.make_cnn``, softmax over 5, about
  97% accurate). Out of distribution: mnist1d's 2500 rows of classes 5-9, which no
  member sees; each fold's models score all of them against the fold's held-out
  rows; OOD AUROC of each model's max probability and entropy and of the ensembles'
  mutual information, averaged over folds.
- ``diabetes`` (regression, 442 rows). Members predict a mean and a variance
  (``{"prediction", "variance"}``, softplus head) of the fold's standardised target
  and train on the Gaussian NLL; the ensemble is their Gaussian mixture
  (``ek.ensemble(members, variance="variance", uncertainty=True)``): its total
  variance, and its epistemic part alone (the members' std). ``ek.calibrate`` scales
  the variance by one ``s²`` fit on the fold's inner validation split. Scores are in
  the target's units (predictions mapped back): RMSE, MAE, Gaussian NLL and coverage
  of μ ± 1.96·σ, pooled over the held-out folds.

Members of one task train side by side in one Keras model (their layers are
disjoint and their losses summed, so each gets exactly its own gradient; each
reads the training rows in its own order): one ``fit`` per fold instead of K.

For each NLL comparison the paired per-row difference (ensemble minus the
other) is reported with a 95% interval (mean ± 1.96 standard errors over rows).

Goals (reported, not asserted): the ensemble beats the oracle best member on
NLL in each task; it beats the member chosen on validation; after
``ek.calibrate`` it beats the best calibrated member (oracle); the ensemble's
mutual-information OOD AUROC beats one member's (member 0's) max-probability
AUROC; regression coverage within 0.03 of 0.95 after variance scaling. The mean
of probabilities alone against the oracle is reported as a goal line too.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ensemblekit as ek  # noqa: E402
from ensemblekit import demo, metrics  # noqa: E402
from ensemblekit.bench.throughput import device_info, write_json_and_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"

HIDDEN = (64, 64)
BATCH_SIZE = 32
# (learning rate, patience): at 3e-3 the tabular members' best validation epoch came at 2-4
# (about 30 steps), so early stopping chose among barely trained weights; at 1e-3 it is 7-25.
TABULAR_TRAINING = (1e-3, 20)
MNIST1D_TRAINING = (3e-3, 10)
VALIDATION = 0.2
_EPSILON = 1e-12  # as ensemblekit.metrics clips probabilities


# --- members --------------------------------------------------------------------------------


def _hidden(inputs, hidden):
    for units in hidden:
        inputs = keras.layers.Dense(units, activation="relu")(inputs)
    return inputs


def mlp(features, units, activation, seed, hidden=HIDDEN):
    """An MLP member with deterministic initial weights: ``Dense(units, activation)`` on ``hidden``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    outputs = keras.layers.Dense(units, activation=activation)(_hidden(inputs, hidden))
    return keras.Model(inputs, outputs, name=f"mlp_{seed}")


def cnn(units, seed, length=40):
    """The demo's Conv1D member (``ensemblekit.demo.make_cnn``) with a ``Dense(units, softmax)`` head,
    taking the ``(length,)`` vector the MLPs take (reshaped to a one-channel sequence)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((length,)),
        keras.layers.Reshape((length, 1)),
        keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
        keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv1D(32, 3, strides=2, padding="same", activation="relu", name="features"),
        keras.layers.Flatten(),
        keras.layers.Dense(units, activation="softmax"),
    ], name=f"cnn_{seed}")


def gaussian_mlp(features, seed, hidden=HIDDEN):
    """A member that predicts a mean and a variance, and the model that trains it with the Gaussian NLL.

    Returns:
        ``(training model, member)``: both share their layers; the member outputs
        ``{"prediction": μ, "variance": σ²}`` (softplus, plus a floor of 1e-6); the
        training model outputs ``[μ, σ²]`` on the last axis.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    hidden = _hidden(inputs, hidden)
    mean = keras.layers.Dense(1, name="mean")(hidden)
    variance = keras.layers.Dense(1, activation="softplus", name="variance")(hidden)
    variance = keras.layers.Rescaling(1.0, offset=1e-6, name="variance_floor")(variance)
    member = keras.Model(inputs, {"prediction": mean, "variance": variance}, name=f"gaussian_mlp_{seed}")
    training = keras.Model(inputs, keras.layers.Concatenate()([mean, variance]), name=f"trainer_{seed}")
    return training, member


def gaussian_nll(y, mean_and_variance):
    """The Gaussian negative log-likelihood (constant dropped) of ``y`` under ``[μ, σ²]`` on the last axis."""
    mean, variance = keras.ops.split(mean_and_variance, 2, axis=-1)
    return keras.ops.mean(0.5 * (keras.ops.log(variance) + keras.ops.square(y - mean) / variance))


def _member_losses(kind):
    """``loss(y, out) -> (batch, members)``: each member's loss, ``y`` ``(batch, members[, 1])``."""
    def binary(y, out):  # y (batch, members, 1)
        return keras.losses.binary_crossentropy(y, out)

    def multiclass(y, out):  # y (batch, members), or (batch, members, 1) as Keras may expand it
        return keras.losses.sparse_categorical_crossentropy(y[..., 0] if len(y.shape) == len(out.shape) else y, out)

    def gaussian(y, out):
        mean, variance = out[..., 0], out[..., 1]
        return 0.5 * (keras.ops.log(variance) + keras.ops.square(y[..., 0] - mean) / variance)

    return {"binary": binary, "multiclass": multiclass, "gaussian": gaussian}[kind]


class _KeepBestPerMember(keras.callbacks.Callback):
    """Early stopping per member: keep each member's best validation epoch; stop when none improved for ``patience``."""

    def __init__(self, trainers, x_val, y_val, losses, patience):
        super().__init__()
        self.trainers, self.losses, self.patience = trainers, losses, patience
        count = len(trainers)
        self.x_val = np.repeat(x_val[:, None], count, axis=1)
        self.y_val = np.repeat(np.asarray(y_val)[:, None], count, axis=1)
        self.best = np.full(count, np.inf)
        self.best_epoch = [0] * count
        self.weights = [t.get_weights() for t in trainers]

    def on_epoch_end(self, epoch, logs=None):
        out = self.model(self.x_val, training=False)
        val = keras.ops.convert_to_numpy(keras.ops.mean(self.losses(self.y_val, out), axis=0))
        for k, loss in enumerate(val):
            if loss < self.best[k]:
                self.best[k], self.best_epoch[k] = float(loss), epoch + 1
                self.weights[k] = self.trainers[k].get_weights()
        if epoch + 1 - max(self.best_epoch) >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        for trainer, weights in zip(self.trainers, self.weights, strict=True):
            trainer.set_weights(weights)


def train_side_by_side(trainers, kind, train, val, epochs, seed, training=MNIST1D_TRAINING):
    """Train ``trainers`` (models ``(batch, features) -> (batch, d)``) together, each on its own row order.

    One model holds them all: input ``(batch, K, features)``, member ``k`` reads slot ``k``,
    which holds the training rows permuted by ``default_rng(seed + k)`` (``fit`` then shuffles
    the slots together each epoch, so every member gets its own random batches). The loss is
    the sum of the members' losses: their weights are disjoint, so each gets its own gradient.

    Returns:
        The epoch each member kept (its lowest validation loss); the trainers hold those weights.
    """
    (x, y), count = train, len(trainers)
    orders = [np.random.default_rng(seed + k).permutation(len(x)) for k in range(count)]
    x_slots = np.stack([x[order] for order in orders], axis=1)
    y_slots = np.stack([np.asarray(y)[order] for order in orders], axis=1)
    inputs = keras.Input(x_slots.shape[1:])
    outputs = keras.ops.stack([trainer(inputs[:, k]) for k, trainer in enumerate(trainers)], axis=1)
    joint = keras.Model(inputs, outputs, name="members_side_by_side")
    losses = _member_losses(kind)
    # One epoch per call into the backend: the members are tiny, per-step overhead dominates on CPU.
    learning_rate, patience = training
    joint.compile(keras.optimizers.Adam(learning_rate), lambda t, o: keras.ops.sum(losses(t, o), axis=-1),
                  steps_per_execution=max(1, len(x) // BATCH_SIZE))
    keep = _KeepBestPerMember(trainers, *val, losses, patience)
    keras.utils.set_random_seed(seed)
    joint.fit(x_slots, y_slots, epochs=epochs, batch_size=BATCH_SIZE, callbacks=[keep], verbose=0)
    return list(keep.best_epoch)


# --- data -----------------------------------------------------------------------------------


def standardise(train_x, *others):
    """``train_x`` and ``others`` standardised with ``train_x``'s mean and std, as float32."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    return [((x - mean) / std).astype("float32") for x in (train_x, *others)]


def folds(y, k, seed, stratified):
    """``[(train rows, validation rows, held-out rows)]``: K folds, each with an inner validation split.

    The held-out folds partition the rows; the inner validation split is ``VALIDATION`` of
    the training rows (stratified by class when ``stratified``).
    """
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    splitter = (StratifiedKFold if stratified else KFold)(k, shuffle=True, random_state=seed)
    result = []
    for fit_rows, held_out in splitter.split(np.zeros(len(y)), y):
        train, val = train_test_split(fit_rows, test_size=VALIDATION, random_state=seed,
                                      stratify=y[fit_rows] if stratified else None)
        result.append((np.sort(train), np.sort(val), held_out))
    return result


# --- scores ---------------------------------------------------------------------------------


def row_nll(prediction, y, task, std=None):
    """Per-row NLL (natural log), as ``ensemblekit.metrics`` averages it."""
    prediction, y = np.asarray(prediction, "float64"), np.asarray(y)
    if task == "binary":
        p, y = prediction.reshape(-1), y.reshape(-1)
        return -np.log(np.clip(np.where(y == 1, p, 1.0 - p), _EPSILON, 1.0))
    if task == "multiclass":
        return -np.log(np.clip(prediction[np.arange(len(y)), y], _EPSILON, 1.0))
    variance = np.maximum(np.asarray(std, "float64").reshape(-1) ** 2, _EPSILON)
    return 0.5 * np.log(2 * np.pi * variance) + (y.reshape(-1) - prediction.reshape(-1)) ** 2 / (2 * variance)


def paired(nll_a, nll_b):
    """Mean per-row difference ``a - b`` and its 95% interval (± 1.96 standard errors)."""
    d = np.asarray(nll_a) - np.asarray(nll_b)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return {"difference": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)]}


def outputs(model, x):
    """The model's outputs on ``x`` as numpy (one eager call: no prediction function to trace)."""
    out = model(x, training=False)
    if isinstance(out, dict):
        return {name: keras.ops.convert_to_numpy(v) for name, v in out.items()}
    return keras.ops.convert_to_numpy(out)


def compare(rows_nll, ensemble_key, member_keys, chosen_key):
    """NLL summary: the ensemble, the oracle best member (lowest NLL), the member chosen on validation,
    the mean member; and the ensemble's paired differences to the oracle and to the chosen member."""
    member_nll = [float(rows_nll[key].mean()) for key in member_keys]
    best = int(np.argmin(member_nll))
    ensemble = rows_nll[ensemble_key]
    return {"ensemble": float(ensemble.mean()), "best member (oracle)": member_nll[best],
            "member chosen on validation": float(rows_nll[chosen_key].mean()),
            "mean member": float(np.mean(member_nll)), "members": member_nll, "best member index": best,
            "ensemble - best member": paired(ensemble, rows_nll[member_keys[best]]),
            "ensemble - chosen member": paired(ensemble, rows_nll[chosen_key])}


def _goals(nll, calibrated):
    return {"ensemble NLL < best member NLL (oracle)": nll["ensemble"] < nll["best member (oracle)"],
            "ensemble NLL < member chosen on validation": nll["ensemble"] < nll["member chosen on validation"],
            "calibrated ensemble NLL < best calibrated member (oracle)":
                calibrated["ensemble"] < calibrated["best member (oracle)"]}


# --- tasks ----------------------------------------------------------------------------------


ENSEMBLE_METHODS = ("mean", "logit_mean")  # the classifier ensembles compared; one is chosen per fold


def _val_nll(model, x_val, y_val, task):
    prediction = outputs(model, x_val)
    prediction = prediction["prediction"] if isinstance(prediction, dict) else prediction
    return float(row_nll(prediction, y_val, task).mean())


def cross_validate_classifiers(x, y, task, make_member, count, epochs, seed, k, x_ood=None,
                               training=MNIST1D_TRAINING):
    """K-fold out-of-fold predictions of ``count`` members and their ensembles (``ENSEMBLE_METHODS``).

    In each fold the members train on the fold's training rows (early stopping on its inner
    validation split); the ensemble of each method, and the one with the lower validation NLL
    (``"chosen"``), predict the held-out rows, as does each member and the member with the
    lowest validation NLL. ``ek.calibrate`` fits each on the validation split too.

    Returns:
        ``(pooled, calibrated, details)``: ``{key: (n, ...) predictions}`` for the keys
        ``member i``, ``member chosen``, ``ensemble (<method>)`` and ``ensemble chosen``;
        details: best epochs, the choices per fold and, with ``x_ood``, each fold's OOD scores.
    """
    names = [f"member {i}" for i in range(count)]
    methods = [f"ensemble ({m})" for m in ENSEMBLE_METHODS]
    keys = (*names, "member chosen", *methods, "ensemble chosen")
    shape = (len(y),) if task == "binary" else (len(y), int(y.max()) + 1)
    pooled = {key: np.zeros(shape) for key in keys}
    calibrated = {key: np.zeros(shape) for key in keys}
    details = {"best_epochs": [], "chosen_member": [], "chosen_method": [], "ood": []}
    y_fit = y[:, None].astype("float32") if task == "binary" else y
    for train, val, test in folds(y, k, seed, stratified=True):
        x_train, x_val, x_test, *ood = standardise(x[train], x[val], x[test],
                                                   *([] if x_ood is None else [x_ood]))
        members = [make_member(seed + i) for i in range(count)]
        details["best_epochs"].append(train_side_by_side(
            members, task, (x_train, y_fit[train]), (x_val, y_fit[val]), epochs, seed, training))
        ensembles = {name: ek.ensemble(members, task=task, method=method, uncertainty=True)
                     for name, method in zip(methods, ENSEMBLE_METHODS, strict=True)}
        models = {**dict(zip(names, members, strict=True)), **ensembles}
        val_nll = {key: _val_nll(model, x_val, y[val], task) for key, model in models.items()}
        member = min(names, key=val_nll.get)
        method = min(methods, key=val_nll.get)
        details["chosen_member"].append(names.index(member))
        details["chosen_method"].append(ENSEMBLE_METHODS[methods.index(method)])
        for key, model in models.items():
            out = outputs(model, x_test)
            pooled[key][test] = (out["prediction"] if isinstance(out, dict) else out).reshape(pooled[key][test].shape)
            plain = model if key in names else ek.ensemble(members, task=task,
                                                           method=ENSEMBLE_METHODS[methods.index(key)])
            calibrated[key][test] = outputs(ek.calibrate(plain, x_val, y[val], task=task),
                                            x_test).reshape(pooled[key][test].shape)
        for pool in (pooled, calibrated):
            pool["member chosen"][test], pool["ensemble chosen"][test] = pool[member][test], pool[method][test]
        if x_ood is not None:
            details["ood"].append(_ood_fold(models, x_test, ood[0], task, member, method))
    return pooled, calibrated, details


def _ood_fold(models, x_in, x_ood, task, member, method):
    """One fold's OOD detection AUROCs: each model's max-prob and entropy, the ensembles' mutual
    information; ``member``/``method``: the keys chosen on validation."""
    result = {}
    for key, model in models.items():
        inside, outside = outputs(model, x_in), outputs(model, x_ood)
        if isinstance(inside, dict):
            scores_in = metrics.ood_scores(inside["prediction"], task, inside["mutual_information"])
            scores_out = metrics.ood_scores(outside["prediction"], task, outside["mutual_information"])
        else:
            scores_in, scores_out = metrics.ood_scores(inside, task), metrics.ood_scores(outside, task)
        result[key] = {score: metrics.ood_detection(scores_in[score], scores_out[score])["auroc"]
                       for score in scores_in}
    result["member chosen"], result["ensemble chosen"] = result[member], result[method]
    return result


def _classifier_report(pooled, calibrated, details, y, task, count, k):
    names = [f"member {i}" for i in range(count)]
    labels = {**{n: n for n in names}, "member chosen": "member chosen on validation (per fold)",
              **{f"ensemble ({m})": f"ensemble ({m})" for m in ENSEMBLE_METHODS},
              "ensemble chosen": "ensemble, method chosen on validation (per fold)"}
    rows = [{"name": labels[key], **metrics.score_task(p, y, task)} for key, p in pooled.items()]
    if details["ood"]:
        for row, key in zip(rows, pooled, strict=True):
            row["ood_auroc"] = {score: float(np.mean([fold[key][score] for fold in details["ood"]]))
                                for score in details["ood"][0][key]}
    nll = compare({key: row_nll(p, y, task) for key, p in pooled.items()}, "ensemble chosen", names, "member chosen")
    cal = compare({key: row_nll(p, y, task) for key, p in calibrated.items()}, "ensemble chosen", names,
                  "member chosen")
    mean_nll = float(row_nll(pooled["ensemble (mean)"], y, task).mean())
    goals = {**_goals(nll, cal),
             "mean-of-probabilities ensemble NLL < best member NLL (oracle)": mean_nll < nll["best member (oracle)"]}
    if details["ood"]:
        auroc = {row["name"]: row["ood_auroc"] for row in rows}
        chosen_mi = auroc[labels["ensemble chosen"]]["mutual_information"]
        member_max_prob = [auroc[n]["max_prob"] for n in names]
        goals["ensemble MI OOD AUROC > member 0's max-prob AUROC"] = chosen_mi > member_max_prob[0]
        goals["ensemble MI OOD AUROC > every member's max-prob AUROC"] = chosen_mi > max(member_max_prob)
    return {"rows": rows, "nll": nll, "calibrated_nll": cal, "best_epochs": details["best_epochs"],
            "chosen_on_validation": details["chosen_member"], "method_chosen_on_validation": details["chosen_method"],
            "folds": k, "samples": len(y), "goals": goals}


def run_binary(count, epochs, seed=0, k=5):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    y = y.astype("int64")
    with demo.deterministic(seed):
        parts = cross_validate_classifiers(x, y, "binary", lambda s: mlp(x.shape[1], 1, "sigmoid", s),
                                           count, epochs, seed, k, training=TABULAR_TRAINING)
    return _classifier_report(*parts, y, "binary", count, k)


def run_regression(count, epochs, seed=0, k=5):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    names = [f"member {i}" for i in range(count)]
    keys = (*names, "chosen", "spread", "mixture", "scaled")
    mean = {key: np.zeros(len(y)) for key in keys}
    std = {key: np.zeros(len(y)) for key in keys}
    cal_mean = {key: np.zeros(len(y)) for key in (*names, "chosen", "mixture")}
    cal_std = {key: np.zeros(len(y)) for key in (*names, "chosen", "mixture")}
    best_epochs, chosen, scales = [], [], []
    with demo.deterministic(seed):
        for train, val, test in folds(y, k, seed, stratified=False):
            x_train, x_val, x_test = standardise(x[train], x[val], x[test])
            y_mean, y_std = y[train].mean(), y[train].std()
            y_train, y_val = (((y[rows] - y_mean) / y_std).astype("float32")[:, None] for rows in (train, val))
            pairs = [gaussian_mlp(x.shape[1], seed + i) for i in range(count)]
            members = [member for _, member in pairs]
            best_epochs.append(train_side_by_side([t for t, _ in pairs], "gaussian", (x_train, y_train),
                                                  (x_val, y_val), epochs, seed, TABULAR_TRAINING))

            def back(out, y_mean=y_mean, y_std=y_std):  # the fold's standardised units -> the target's units
                return out["prediction"].reshape(-1) * y_std + y_mean, np.sqrt(out["variance"]).reshape(-1) * y_std

            for key, member in zip(names, members, strict=True):
                mean[key][test], std[key][test] = back(outputs(member, x_test))
                cal_mean[key][test], cal_std[key][test] = back(
                    outputs(ek.calibrate(member, x_val, y_val, task="regression"), x_test))
            mixture = ek.ensemble(members, variance="variance", uncertainty=True)
            out = outputs(mixture, x_test)
            mean["mixture"][test], std["mixture"][test] = back(out)
            mean["spread"][test], std["spread"][test] = mean["mixture"][test], out["std"].reshape(-1) * y_std
            scaled = ek.calibrate(mixture, x_val, y_val)  # variance -> s² · variance, s fit on validation
            scales.append(float(np.sqrt(scaled.layers[-1].scale)))
            mean["scaled"][test], std["scaled"][test] = back(outputs(scaled, x_test))
            cal_mean["mixture"][test], cal_std["mixture"][test] = mean["scaled"][test], std["scaled"][test]
            val_nll = [metrics.gaussian_nll(o["prediction"], np.sqrt(o["variance"]), y_val)
                       for o in (outputs(m, x_val) for m in members)]
            chosen.append(int(np.argmin(val_nll)))
            for pool, cal in ((mean, cal_mean), (std, cal_std)):
                pool["chosen"][test] = pool[names[chosen[-1]]][test]
                cal["chosen"][test] = cal[names[chosen[-1]]][test]
    labels = {**{n: f"{n} (σ² = its variance)" for n in names},
              "chosen": "member chosen on validation (per fold)",
              "spread": "ensemble (σ = members' std only)", "mixture": "ensemble (σ² = mixture's total variance)",
              "scaled": "ensemble (σ² = s² × total variance, ek.calibrate per fold)"}
    rows = [{"name": labels[key], **metrics.score_task(mean[key], y, "regression", std=std[key])} for key in keys]
    nll = compare({key: row_nll(mean[key], y, "regression", std[key]) for key in keys}, "mixture", names, "chosen")
    cal = compare({key: row_nll(cal_mean[key], y, "regression", cal_std[key]) for key in cal_mean},
                  "mixture", names, "chosen")
    coverage = rows[-1]["coverage"]
    return {"rows": rows, "nll": nll, "calibrated_nll": cal, "variance_scales": scales,
            "best_epochs": best_epochs, "chosen_on_validation": chosen, "folds": k, "samples": len(y),
            "goals": {**_goals(nll, cal), "coverage within 0.03 of 0.95 after scaling (pooled held-out folds)":
                      abs(coverage - 0.95) <= 0.03}}


def load_mnist1d_ood(known=5):
    """mnist1d's rows (its standard train and test splits together): ``(x, y)`` of classes ``< known``
    and the rows of the other classes (out of distribution), as ``(n, 40)`` float32."""
    from ensemblekit.datasets import load_mnist1d

    (x, y), (x_test, y_test) = load_mnist1d(channels_last=False)
    x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
    return (x[y < known], y[y < known]), x[y >= known]


def run_ood(count, epochs, seed=0, known=5, member="mlp", k=5):
    (x, y), x_ood = load_mnist1d_ood(known)

    def make_member(member_seed):
        if member == "mlp":
            return mlp(x.shape[1], known, "softmax", member_seed)
        return cnn(known, member_seed)

    with demo.deterministic(seed):
        parts = cross_validate_classifiers(x, y, "multiclass", make_member, count, epochs, seed, k, x_ood=x_ood)
    return {**_classifier_report(*parts, y, "multiclass", count, k), "member": member,
            "out_of_distribution": len(x_ood)}


TASKS = {
    # name: (runner, task, most epochs (early stopping decides), quick epochs, keyword arguments)
    "breast_cancer": (run_binary, "binary", 200, 10, {}),
    "diabetes": (run_regression, "regression", 200, 15, {}),
    "mnist1d_ood": (run_ood, "multiclass + OOD", 200, 10, {"member": "mlp"}),
    "mnist1d_cnn_ood": (run_ood, "multiclass + OOD", 200, 10, {"member": "cnn"}),
}


# --- report ---------------------------------------------------------------------------------


def _table(rows, columns):
    header = "| model | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    lines += [f"| {row['name']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for row in rows]
    return lines


def _nll_lines(nll, what):
    def ci(key):
        p = nll[key]
        return f"{p['difference']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"

    return [f"{what}: ensemble {nll['ensemble']:.4f}; best member (oracle: member {nll['best member index']}) "
            f"{nll['best member (oracle)']:.4f}; member chosen on validation {nll['member chosen on validation']:.4f}; "
            f"mean member {nll['mean member']:.4f}. Paired per-row difference, ensemble minus best member "
            f"{ci('ensemble - best member')}, minus chosen member {ci('ensemble - chosen member')} (95% interval)."]


def _training_text(training):
    return f"Adam at {training[0]:g}, patience {training[1]}"


def to_markdown(result):
    info = result["info"]
    lines = [f"# Every kind of member ({info['device']}, {info['backend']}, Keras {info['keras']})", "",
             f"{result['members']} members per task (MLP: hidden {HIDDEN}; CNN: the demo's Conv1D stack), seeds "
             f"{result['seed']}...{result['seed'] + result['members'] - 1}, batch {BATCH_SIZE}, early stopping on "
             f"an inner validation split ({VALIDATION:.0%} of the training rows): "
             f"{_training_text(TABULAR_TRAINING)} (breast_cancer, diabetes), {_training_text(MNIST1D_TRAINING)} "
             f"(mnist1d); {result['seconds']:.0f} s in all. Nothing is fit or chosen on held-out rows; \"best member "
             "(oracle)\" is the member index with the lowest held-out NLL. Classifier ensembles: the mean of "
             "probabilities and the mean of logits (`method=\"logit_mean\"`); in each fold the one with the lower "
             "validation NLL is \"the ensemble\" of the goals, as the member with the lowest validation NLL is "
             "\"the member chosen on validation\".", ""]
    for name, part in result["tasks"].items():
        lines += [f"## {name}: {part['task']}, at most {part['epochs']} epochs ({part['seconds']:.0f} s)", ""]
        epochs = "; ".join(", ".join(map(str, fold)) for fold in part["best_epochs"])
        chosen = ", ".join(map(str, part["chosen_on_validation"]))
        methods = ", ".join(part.get("method_chosen_on_validation", []))
        if part["task"] != "regression":
            lines += [f"{part['folds']}-fold cross-validation (stratified, seed {result['seed']}) over all "
                      f"{part['samples']} rows: every number below is on the pooled out-of-fold predictions. "
                      f"Best validation epoch of each member, per fold: {epochs}. Member chosen on validation, "
                      f"per fold: {chosen}. Ensemble method chosen on validation, per fold: {methods}.", ""]
        if part["task"] == "binary":
            lines += _table(part["rows"], ["accuracy", "auroc", "nll", "brier", "ece"])
        elif part["task"] == "regression":
            lines += [f"{part['folds']}-fold cross-validation (seed {result['seed']}) over all {part['samples']} "
                      "rows: every number below is on the pooled out-of-fold predictions. Best validation epoch "
                      f"of each member, per fold: {epochs}. Member chosen on validation, per fold: {chosen}.", ""]
            lines += _table(part["rows"], ["rmse", "mae", "nll", "coverage"])
            lines += ["", "Target units (disease progression); variance scale s fit on each fold's validation "
                      "split: " + ", ".join(f"{s:.3f}" for s in part["variance_scales"]) + "."]
        else:
            kind = {"mlp": f"MLP members (hidden {HIDDEN}) on the 40 values as a vector",
                    "cnn": "CNN members (the demo's Conv1D stack, softmax over 5) on the 40 values as a sequence"}
            lines[-2] += (f" {kind[part['member']]}; mnist1d's classes 0-4 (its train and test rows together) in "
                          f"distribution, its {part['out_of_distribution']} rows of classes 5-9 out of distribution "
                          "(OOD AUROC: each fold's models on all of them against the fold's held-out rows, "
                          "averaged over folds; the ensembles' mutual information, every model's max probability "
                          "and entropy).")
            rows = [{**row, **{f"{score} AUROC": row["ood_auroc"][score] for score in row["ood_auroc"]},
                     **({} if "mutual_information" in row["ood_auroc"] else {"mutual_information AUROC": np.nan})}
                    for row in part["rows"]]
            lines += _table(rows, ["accuracy", "nll", "ece", "max_prob AUROC", "entropy AUROC",
                                   "mutual_information AUROC"])
        lines += ["", *_nll_lines(part["nll"], "NLL")]
        lines += ["", *_nll_lines(part["calibrated_nll"], "NLL after `ek.calibrate` on the validation split "
                                  "(each member and the ensemble)")]
        lines += [""] + [f"- {goal}: {'met' if met else 'NOT met'}" for goal, met in part["goals"].items()]
        lines += [""]
    return "\n".join(lines).replace("| nan |", "| – |")


def run(quick=False, seed=0, tasks=tuple(TASKS), members=None, epochs=None, k=None):
    """Train, compose and score every task in ``tasks``; ``members``/``epochs``/``k`` (folds) override defaults."""
    count = members or (3 if quick else 5)
    k = k or (3 if quick else 5)
    start = time.perf_counter()
    result = {"info": device_info(), "quick": quick, "members": count, "seed": seed, "tasks": {}}
    for name in tasks:
        runner, task, full_epochs, quick_epochs, kwargs = TASKS[name]
        task_epochs = epochs or (quick_epochs if quick else full_epochs)
        task_start = time.perf_counter()
        part = runner(count, task_epochs, seed, k=k, **kwargs)
        result["tasks"][name] = {"task": task, "epochs": task_epochs, **part,
                                 "seconds": time.perf_counter() - task_start}
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 members, 3 folds, short training")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = run(quick=args.quick, seed=args.seed, tasks=args.tasks)
    markdown = to_markdown(result)
    write_json_and_markdown(result, markdown, args.out, "tasks_quick" if args.quick else "tasks")
    print(markdown)
    return 0


if __name__ == "__main__":
    main()
