"""Every kind of member: binary, regression and OOD detection with ``ek.ensemble(..., uncertainty=True)``.

Run: ``python -m benchmarks.tasks [--quick]`` (about 2 minutes on 2 CPU cores; ``--quick``: 40 s).
Writes ``benchmarks/results/tasks.json`` and ``tasks.md`` (``--quick``: ``tasks_quick.*``).

Members are trained as deep ensembles are (Lakshminarayanan et al., 2017): one
architecture per task (an MLP with two hidden layers of 64; the demo's CNN for
``mnist1d_cnn_ood``), member ``i`` seeded ``seed + i``
(initial weights and its own order of the training rows), all training rows,
Adam, early stopping on an inner validation split (each member keeps its best
validation epoch). Inputs are standardised with the training rows' statistics.
Nothing is tuned on held-out rows: early stopping, calibration (``ek.calibrate``)
and the choice of "member chosen on validation" use the inner validation split.

- ``breast_cancer`` (binary, 569 rows): stratified K-fold cross-validation (5
  folds, fixed seed). In each fold the members (seeds ``seed..seed+K-1``, the
  same in every fold) train on the other folds less a stratified 20% inner
  validation split, and predict the held-out fold. Out-of-fold predictions are
  pooled over all rows; members (by index), the member chosen on validation (per
  fold) and the mean ensemble are compared on the pooled accuracy, AUROC, NLL,
  Brier and ECE (``ensemblekit.metrics``). The oracle "best member" is the member
  index with the lowest pooled NLL.
- ``diabetes`` (regression, 442 rows): the same K-fold protocol (unstratified).
  Members predict a mean and a variance (``{"prediction", "variance"}``, softplus
  head) of the fold's standardised target and train on the Gaussian NLL; the
  ensemble is their Gaussian mixture (``ek.ensemble(members, variance="variance",
  uncertainty=True)``): its total variance, and its epistemic part alone (the
  members' std). ``ek.calibrate`` scales the variance by one ``s²`` fit on the
  fold's inner validation split. Scores are in the target's units (predictions
  mapped back): RMSE, MAE, Gaussian NLL and coverage of μ ± 1.96·σ, pooled over
  the held-out folds.
- ``mnist1d_ood`` and ``mnist1d_cnn_ood`` (multiclass + OOD): mnist1d (Greydanus,
  2020; generated locally, its standard 4000/1000 split) classes 0-4 in
  distribution (a stratified 20% validation split of their training rows), the
  test rows of classes 5-9 out of distribution (positives); one split (about 500
  test rows each side, with 5-40% errors, so NLL has errors to measure). The MLP
  members see the 40 values as a vector (about 63% accurate); the CNN members
  are the demo's Conv1D stack (``ensemblekit.demo.make_cnn``, softmax over 5,
  about 97% accurate). OOD AUROC/AUPR/FPR95 of each member's max probability
  and entropy, and of the ensemble's mutual information.

Members of one task train side by side in one Keras model (their layers are
disjoint and their losses summed, so each gets exactly its own gradient; each
reads the training rows in its own order): one ``fit`` per fold instead of K.

For each NLL comparison the paired per-row difference (ensemble minus the
other) is reported with a 95% interval (mean ± 1.96 standard errors over rows).

Goals (reported, not asserted): the ensemble beats the oracle best member on
NLL in each task; it beats the member chosen on validation; after
``ek.calibrate`` it beats the best calibrated member (oracle); the ensemble's
mutual-information OOD AUROC beats one member's (member 0's) max-probability
AUROC; regression coverage within 0.03 of 0.95 after variance scaling.
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
PATIENCE = 10
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
    """The demo's Conv1D member (``ensemblekit.demo.make_cnn``) with a ``Dense(units, softmax)`` head."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((length, 1)),
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


def train_side_by_side(trainers, kind, train, val, epochs, seed, learning_rate=3e-3):
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
    joint.compile(keras.optimizers.Adam(learning_rate), lambda t, o: keras.ops.sum(losses(t, o), axis=-1),
                  steps_per_execution=max(1, len(x) // BATCH_SIZE))
    keep = _KeepBestPerMember(trainers, *val, losses, PATIENCE)
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


def run_binary(count, epochs, seed=0, k=5):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    y = y.astype("int64")
    names = [f"member {i}" for i in range(count)]
    pooled = {key: np.zeros(len(y)) for key in (*names, "chosen", "ensemble")}
    calibrated = {key: np.zeros(len(y)) for key in (*names, "chosen", "ensemble")}
    best_epochs, chosen = [], []
    with demo.deterministic(seed):
        for train, val, test in folds(y, k, seed, stratified=True):
            x_train, x_val, x_test = standardise(x[train], x[val], x[test])
            members = [mlp(x.shape[1], 1, "sigmoid", seed + i) for i in range(count)]
            best_epochs.append(train_side_by_side(members, "binary", (x_train, y[train, None].astype("float32")),
                                                  (x_val, y[val, None].astype("float32")), epochs, seed))
            ensemble = ek.ensemble(members, task="binary", uncertainty=True)
            models = [*members, ensemble]
            for key, model in zip((*names, "ensemble"), models, strict=True):
                out = outputs(model, x_test)
                pooled[key][test] = (out["prediction"] if isinstance(out, dict) else out).reshape(-1)
                calibrated[key][test] = outputs(ek.calibrate(model if key != "ensemble" else
                                                             ek.ensemble(members, task="binary"),
                                                             x_val, y[val]), x_test).reshape(-1)
            val_nll = [metrics.binary_nll(outputs(m, x_val).reshape(-1), y[val]) for m in members]
            chosen.append(int(np.argmin(val_nll)))
            pooled["chosen"][test] = pooled[names[chosen[-1]]][test]
            calibrated["chosen"][test] = calibrated[names[chosen[-1]]][test]
    labels = {**{n: n for n in names}, "chosen": "member chosen on validation (per fold)",
              "ensemble": "ensemble (mean)"}
    rows = [{"name": labels[key], **metrics.score_task(p, y, "binary")} for key, p in pooled.items()]
    nll = compare({key: row_nll(p, y, "binary") for key, p in pooled.items()}, "ensemble", names, "chosen")
    cal = compare({key: row_nll(p, y, "binary") for key, p in calibrated.items()}, "ensemble", names, "chosen")
    return {"rows": rows, "nll": nll, "calibrated_nll": cal, "best_epochs": best_epochs,
            "chosen_on_validation": chosen, "folds": k, "samples": len(y), "goals": _goals(nll, cal)}


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
                                                  (x_val, y_val), epochs, seed))

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


def load_mnist1d_ood(known=5, seed=0):
    """mnist1d's standard split: ``(train, val, test)`` of classes ``< known`` and the OOD test rows."""
    from sklearn.model_selection import train_test_split

    from ensemblekit.datasets import load_mnist1d

    (x, y), (x_test, y_test) = load_mnist1d(channels_last=False)
    inside = y < known
    train, val = train_test_split(np.flatnonzero(inside), test_size=VALIDATION, random_state=seed,
                                  stratify=y[inside])
    x_train, x_val, x_in, x_ood = standardise(x[train], x[val], x_test[y_test < known], x_test[y_test >= known])
    return (x_train, y[train]), (x_val, y[val]), (x_in, y_test[y_test < known]), x_ood


def run_ood(count, epochs, seed=0, known=5, member="mlp"):
    (x_train, y_train), (x_val, y_val), (x_test, y_test), x_ood = load_mnist1d_ood(known, seed)
    if member == "cnn":  # sequences (n, 40, 1)
        x_train, x_val, x_test, x_ood = (x[..., None] for x in (x_train, x_val, x_test, x_ood))
    with demo.deterministic(seed):
        members = [mlp(x_train.shape[1], known, "softmax", seed + i) if member == "mlp" else cnn(known, seed + i)
                   for i in range(count)]
        best_epochs = train_side_by_side(members, "multiclass", (x_train, y_train), (x_val, y_val), epochs, seed)
    model = ek.ensemble(members, task="multiclass", uncertainty=True)
    names = [f"member {i}" for i in range(count)]
    rows = [{"name": name, **metrics.evaluate(m, x_test, y_test, x_ood=x_ood)}
            for name, m in zip(names, members, strict=True)]
    val_nll = [metrics.nll(outputs(m, x_val), y_val) for m in members]
    chosen = int(np.argmin(val_nll))
    rows.append({"name": "ensemble (mean)", **metrics.evaluate(model, x_test, y_test, x_ood=x_ood)})
    probs = {**{n: outputs(m, x_test) for n, m in zip(names, members, strict=True)},
             "ensemble": outputs(model, x_test)["prediction"]}
    probs["chosen"] = probs[names[chosen]]
    nll = compare({key: row_nll(p, y_test, "multiclass") for key, p in probs.items()}, "ensemble", names, "chosen")
    cal_probs = {key: outputs(ek.calibrate(m, x_val, y_val), x_test)
                 for key, m in zip((*names, "ensemble"), (*members, ek.ensemble(members)), strict=True)}
    cal_probs["chosen"] = cal_probs[names[chosen]]
    cal = compare({key: row_nll(p, y_test, "multiclass") for key, p in cal_probs.items()},
                  "ensemble", names, "chosen")
    ensemble_mi = rows[-1]["ood"]["mutual_information"]["auroc"]
    member_max_prob = [row["ood"]["max_prob"]["auroc"] for row in rows[:-1]]
    goals = {**_goals(nll, cal),
             "ensemble MI OOD AUROC > member 0's max-prob AUROC": ensemble_mi > member_max_prob[0],
             "ensemble MI OOD AUROC > every member's max-prob AUROC": ensemble_mi > max(member_max_prob)}
    return {"rows": rows, "nll": nll, "calibrated_nll": cal, "best_epochs": [best_epochs], "member": member,
            "chosen_on_validation": [chosen], "train": len(x_train), "validation": len(x_val),
            "in_distribution": len(x_test), "out_of_distribution": len(x_ood), "goals": goals}


TASKS = {
    # name: (runner, task, most epochs (early stopping decides), quick epochs, keyword arguments)
    "breast_cancer": (run_binary, "binary", 200, 10, {}),
    "diabetes": (run_regression, "regression", 200, 15, {}),
    "mnist1d_ood": (run_ood, "multiclass + OOD", 200, 10, {"member": "mlp"}),
    "mnist1d_cnn_ood": (run_ood, "multiclass + OOD", 200, 10, {"member": "cnn"}),
}
CROSS_VALIDATED = ("binary", "regression")


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


def to_markdown(result):
    info = result["info"]
    lines = [f"# Every kind of member ({info['device']}, {info['backend']}, Keras {info['keras']})", "",
             f"{result['members']} members per task (MLP: hidden {HIDDEN}; CNN: the demo's Conv1D stack; seeds {result['seed']}..."
             f"{result['seed'] + result['members'] - 1}, Adam, batch {BATCH_SIZE}, early stopping on an inner "
             f"validation split ({VALIDATION:.0%} of the training rows), patience {PATIENCE}); "
             f"{result['seconds']:.0f} s in all. Nothing is fit or chosen on held-out rows; \"best member "
             "(oracle)\" is the member index with the lowest held-out NLL.", ""]
    for name, part in result["tasks"].items():
        lines += [f"## {name}: {part['task']}, at most {part['epochs']} epochs ({part['seconds']:.0f} s)", ""]
        epochs = "; ".join(", ".join(map(str, fold)) for fold in part["best_epochs"])
        if "folds" in part:
            lines += [f"{part['folds']}-fold cross-validation ({'stratified, ' if part['task'] == 'binary' else ''}"
                      f"seed {result['seed']}) over all {part['samples']} rows: every number below is on the "
                      "pooled out-of-fold predictions. Best validation epoch of each member, per fold: "
                      f"{epochs}. Member chosen on validation, per fold: "
                      + ", ".join(map(str, part["chosen_on_validation"])) + ".", ""]
        if part["task"] == "binary":
            lines += _table(part["rows"], ["accuracy", "auroc", "nll", "brier", "ece"])
        elif part["task"] == "regression":
            lines += _table(part["rows"], ["rmse", "mae", "nll", "coverage"])
            lines += ["", "Target units (disease progression); variance scale s fit on each fold's validation "
                      "split: " + ", ".join(f"{s:.3f}" for s in part["variance_scales"]) + "."]
        else:
            kind = {"mlp": f"MLP members (hidden {HIDDEN}) on the 40 values as a vector",
                    "cnn": "CNN members (the demo's Conv1D stack, softmax over 5) on the (40, 1) sequence"}
            lines += [f"{kind[part['member']]}. mnist1d classes 0-4: {part['train']} training, {part['validation']} validation, "
                      f"{part['in_distribution']} test rows; {part['out_of_distribution']} test rows of classes "
                      f"5-9 (OOD). Best validation epoch of each member: {epochs}.", ""]
            rows = [{**row, **{f"{score} AUROC": row["ood"][score]["auroc"] for score in row["ood"]}}
                    for row in part["rows"]]
            lines += _table(rows[:-1], ["accuracy", "nll", "ece", "max_prob AUROC", "entropy AUROC"])
            lines += ["", *_table(rows[-1:], ["accuracy", "nll", "ece", "max_prob AUROC", "entropy AUROC",
                                               "mutual_information AUROC"])]
        lines += ["", *_nll_lines(part["nll"], "NLL")]
        lines += ["", *_nll_lines(part["calibrated_nll"], "NLL after `ek.calibrate` on the validation split "
                                  "(each member and the ensemble)")]
        lines += [""] + [f"- {goal}: {'met' if met else 'NOT met'}" for goal, met in part["goals"].items()]
        lines += [""]
    return "\n".join(lines)


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
        part = runner(count, task_epochs, seed, **kwargs, **({"k": k} if task in CROSS_VALIDATED else {}))
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
