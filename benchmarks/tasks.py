"""Every kind of member: binary, regression and OOD detection with ``ek.ensemble(..., uncertainty=True)``.

Run: ``python -m benchmarks.tasks [--quick]`` (1-2 minutes on 2 CPU cores; ``--quick``: 30 s).
Writes ``benchmarks/results/tasks.json`` and ``tasks.md`` (``--quick``: ``tasks_quick.*``).

Three tasks on scikit-learn's bundled data, 5 MLP members each, one fixed
60/20/20 train/validation/test split, inputs standardised with the training
rows' statistics. Members are trained as deep ensembles are (Lakshminarayanan
et al., 2017): one architecture (two hidden layers of 64), member ``i`` seeded
``seed + i`` (initial weights and shuffling), all training rows, Adam, and early
stopping on the validation loss (the best epoch's weights kept). Nothing is
tuned on the test split.

- ``breast_cancer`` (binary): members end in ``Dense(1, sigmoid)``; members vs the
  mean ensemble on accuracy, AUROC, NLL, Brier and ECE (``ensemblekit.metrics``).
- ``diabetes`` (regression, standardised targets): members predict a mean and a
  variance (``{"prediction", "variance"}``, softplus head) and are trained with the
  Gaussian NLL; the ensemble is their Gaussian mixture
  (``ek.ensemble(members, variance="variance", uncertainty=True)``): the mixture's
  total variance, and also its epistemic part alone (the members' std), to show
  what the members' own variance adds. ``ek.calibrate`` scales a variance by one
  ``s²`` fit on the validation split, ``s² = mean((y - μ)² / σ²)``; NLL and
  coverage of μ ± 1.96·σ.
- ``digits_ood``: members trained on digits 0-4 (softmax over 5); the test rows of
  digits 5-9 are out of distribution (positives). OOD AUROC/AUPR/FPR95 of each
  member's max probability and entropy, and of the ensemble's mutual information.

Goals (reported, not asserted): the ensemble beats the best member on NLL in
each task (the best member chosen on test: an oracle); it beats the member
chosen on validation; after ``ek.calibrate`` it beats the best calibrated
member; the ensemble's mutual-information OOD AUROC beats one member's
(member 0's) max-probability AUROC; coverage within 0.03 of 0.95 after scaling.
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
LOSSES = {"sigmoid": "binary_crossentropy", "softmax": "sparse_categorical_crossentropy", None: "mse"}


HIDDEN = (64, 64)
BATCH_SIZE = 32
PATIENCE = 10


def _hidden(inputs, hidden):
    for units in hidden:
        inputs = keras.layers.Dense(units, activation="relu")(inputs)
    return inputs


def _compile(model, loss, rows, learning_rate):
    # One epoch per call into the backend: these models are tiny, per-step overhead dominates on CPU.
    model.compile(keras.optimizers.Adam(learning_rate), loss,
                  steps_per_execution=max(1, rows // BATCH_SIZE))
    return model


def mlp(features, units, activation, seed, hidden=HIDDEN, learning_rate=3e-3, rows=BATCH_SIZE):
    """An MLP with deterministic initial weights, compiled for its task."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    outputs = keras.layers.Dense(units, activation=activation)(_hidden(inputs, hidden))
    return _compile(keras.Model(inputs, outputs, name=f"mlp_{seed}"), LOSSES[activation], rows, learning_rate)


def gaussian_nll(y, mean_and_variance):
    """The Gaussian negative log-likelihood (constant dropped) of ``y`` under ``[μ, σ²]`` on the last axis."""
    mean, variance = keras.ops.split(mean_and_variance, 2, axis=-1)
    return keras.ops.mean(0.5 * (keras.ops.log(variance) + keras.ops.square(y - mean) / variance))


def gaussian_mlp(features, seed, hidden=HIDDEN, learning_rate=3e-3, rows=BATCH_SIZE):
    """A member that predicts a mean and a variance, and the model that trains it with the Gaussian NLL.

    Returns:
        ``(training model, member)``: both share their layers; the member outputs
        ``{"prediction": μ, "variance": σ²}`` (softplus, plus a floor of 1e-6).
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    hidden = _hidden(inputs, hidden)
    mean = keras.layers.Dense(1, name="mean")(hidden)
    variance = keras.layers.Dense(1, activation="softplus", name="variance")(hidden)
    variance = keras.layers.Rescaling(1.0, offset=1e-6, name="variance_floor")(variance)
    member = keras.Model(inputs, {"prediction": mean, "variance": variance}, name=f"gaussian_mlp_{seed}")
    training = keras.Model(inputs, keras.layers.Concatenate()([mean, variance]))
    return _compile(training, gaussian_nll, rows, learning_rate), member


def split(x, y, seed=0, standardise=True):
    """``{"train", "val", "test": (x, y)}``: a fixed 60/20/20 permutation, x standardised on train."""
    order = np.random.default_rng(seed).permutation(len(x))
    cuts = [int(0.6 * len(x)), int(0.8 * len(x))]
    parts = dict(zip(("train", "val", "test"), np.split(order, cuts), strict=True))
    mean, std = (x[parts["train"]].mean(0), x[parts["train"]].std(0) + 1e-8) if standardise else (0.0, 1.0)
    return {name: (((x[rows] - mean) / std).astype("float32"), y[rows]) for name, rows in parts.items()}


def fit_early_stopped(model, data, epochs, seed):
    """Fit on the training rows, keep the epoch with the lowest validation loss (at most ``epochs``)."""
    keras.utils.set_random_seed(seed)
    stop = keras.callbacks.EarlyStopping(patience=PATIENCE, restore_best_weights=True)
    model.fit(*data["train"], epochs=epochs, batch_size=BATCH_SIZE, validation_data=data["val"],
              callbacks=[stop], verbose=0)
    return len(model.history.epoch)


def train_members(data, units, activation, count, epochs, seed):
    """``count`` members (member ``i`` seeded ``seed + i``) and the epochs each trained."""
    x, _ = data["train"]
    members, trained = [], []
    with demo.deterministic(seed):
        for i in range(count):
            member = mlp(x.shape[1], units, activation, seed + i, rows=len(x))
            trained.append(fit_early_stopped(member, data, epochs, seed + i))
            members.append(member)
    return members, trained


def run_binary(count, epochs, seed=0):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    data = split(x, y.astype("int64"), seed)
    members, trained = train_members(data, 1, "sigmoid", count, epochs, seed)
    (x_val, y_val), (x_test, y_test) = data["val"], data["test"]
    rows = [{"name": f"member {i}", **metrics.evaluate(m, x_test, y_test)} for i, m in enumerate(members)]
    model = ek.ensemble(members, task="binary", uncertainty=True)
    rows.append({"name": "ensemble (mean)", **metrics.evaluate(model, x_test, y_test)})
    val_nll = [metrics.evaluate(m, x_val, y_val)["nll"] for m in members]
    nll = nll_summary(rows[:-1], rows[-1], val_nll)
    calibrated = calibrated_nll(members, ek.ensemble(members, task="binary"), (x_val, y_val), (x_test, y_test))
    return {"rows": rows, "nll": nll, "calibrated_nll": calibrated, "trained_epochs": trained, "goals": {
        "ensemble NLL < best member NLL (oracle: best on test)": nll["ensemble"] < nll["best member"],
        "ensemble NLL < member chosen on validation": nll["ensemble"] < nll["member chosen on validation"],
        "calibrated ensemble NLL < best calibrated member (oracle)":
            calibrated["ensemble"] < calibrated["best member"]}}


def calibrated_nll(members, ensemble, validation, test, task=None):
    """Test NLL after ``ek.calibrate`` on validation (Platt, temperature or variance scaling), for each model."""
    def nll(model):
        return metrics.evaluate(ek.calibrate(model, *validation, task=task), *test, task=task)["nll"]

    member_nll = [nll(m) for m in members]
    return {"ensemble": nll(ensemble), "best member": min(member_nll), "members": member_nll}


def nll_summary(member_rows, ensemble_row, val_nll):
    """Test NLL of the ensemble, the best member (chosen on test), the member chosen on validation, the mean member."""
    test_nll = [row["nll"] for row in member_rows]
    return {"ensemble": ensemble_row["nll"], "best member": min(test_nll),
            "member chosen on validation": test_nll[int(np.argmin(val_nll))],
            "mean member": float(np.mean(test_nll))}


def train_gaussian_members(data, count, epochs, seed):
    """``count`` mean-and-variance members trained with the Gaussian NLL, and the epochs each trained."""
    x, _ = data["train"]
    members, trained = [], []
    with demo.deterministic(seed):
        for i in range(count):
            training, member = gaussian_mlp(x.shape[1], seed + i, rows=len(x))
            trained.append(fit_early_stopped(training, data, epochs, seed + i))
            members.append(member)
    return members, trained


def run_regression(count, epochs, seed=0):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    data = split(x, y[:, None], seed)
    y_mean, y_std = data["train"][1].mean(), data["train"][1].std()
    data = {name: (xs, ((ys - y_mean) / y_std).astype("float32")) for name, (xs, ys) in data.items()}
    members, trained = train_gaussian_members(data, count, epochs, seed)
    (x_val, y_val), (x_test, y_test) = data["val"], data["test"]
    rows = [{"name": f"member {i} (σ² = its variance)", **metrics.evaluate(m, x_test, y_test, task="regression")}
            for i, m in enumerate(members)]
    val_nll = [metrics.evaluate(m, x_val, y_val, task="regression")["nll"] for m in members]
    model = ek.ensemble(members, variance="variance", uncertainty=True)
    test = metrics.predict_outputs(model, x_test)
    rows.append({"name": "ensemble (σ = members' std only)", **metrics.score_task(
        test["prediction"], y_test, "regression", std=test["std"])})
    rows.append({"name": "ensemble (σ² = mixture's total variance)", **metrics.evaluate(model, x_test, y_test)})
    calibrated = ek.calibrate(model, x_val, y_val)  # variance scaling: variance -> s² · variance
    scale = float(np.sqrt(calibrated.layers[-1].scale))
    rows.append({"name": f"ensemble (σ² = {scale:.2f}² × total variance, ek.calibrate)",
                 **metrics.evaluate(calibrated, x_test, y_test)})
    nll = nll_summary(rows[:count], rows[count + 1], val_nll)
    calibrated_nlls = calibrated_nll(members, model, (x_val, y_val), (x_test, y_test), task="regression")
    return {"rows": rows, "variance_scale": scale, "nll": nll, "calibrated_nll": calibrated_nlls,
            "trained_epochs": trained, "goals": {
                "ensemble NLL < best member NLL (oracle: best on test)": nll["ensemble"] < nll["best member"],
                "ensemble NLL < member chosen on validation":
                    nll["ensemble"] < nll["member chosen on validation"],
                "calibrated ensemble NLL < best calibrated member (oracle)":
                    calibrated_nlls["ensemble"] < calibrated_nlls["best member"],
                "coverage within 0.03 of 0.95 after scaling": abs(rows[-1]["coverage"] - 0.95) <= 0.03,
            }}


def run_ood(count, epochs, seed=0, known=5):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = split(x / 16.0, y.astype("int64"), seed, standardise=False)  # rare pixels: tiny train std
    inside = {name: (xs[ys < known], ys[ys < known]) for name, (xs, ys) in data.items()}
    x_ood = data["test"][0][data["test"][1] >= known]
    members, trained = train_members(inside, known, "softmax", count, epochs, seed)
    (x_val, y_val), (x_test, y_test) = inside["val"], inside["test"]
    rows = [{"name": f"member {i}", **metrics.evaluate(m, x_test, y_test, x_ood=x_ood)}
            for i, m in enumerate(members)]
    model = ek.ensemble(members, task="multiclass", uncertainty=True)
    rows.append({"name": "ensemble (mean)", **metrics.evaluate(model, x_test, y_test, x_ood=x_ood)})
    ensemble_mi = rows[-1]["ood"]["mutual_information"]["auroc"]
    nll = nll_summary(rows[:-1], rows[-1], [metrics.evaluate(m, x_val, y_val)["nll"] for m in members])
    calibrated = calibrated_nll(members, ek.ensemble(members), (x_val, y_val), (x_test, y_test))
    goals = {"ensemble NLL < best member NLL (oracle: best on test)": nll["ensemble"] < nll["best member"],
             "ensemble NLL < member chosen on validation": nll["ensemble"] < nll["member chosen on validation"],
             "calibrated ensemble NLL < best calibrated member (oracle)":
                 calibrated["ensemble"] < calibrated["best member"],
             "ensemble MI OOD AUROC > member 0's max-prob AUROC": ensemble_mi > rows[0]["ood"]["max_prob"]["auroc"]}
    return {"rows": rows, "nll": nll, "calibrated_nll": calibrated, "trained_epochs": trained,
            "in_distribution": len(x_test),
            "out_of_distribution": len(x_ood), "goals": goals}


TASKS = {
    # name: (runner, most epochs (early stopping decides), quick epochs)
    "breast_cancer": (run_binary, 200, 10),
    "diabetes": (run_regression, 200, 15),
    "digits_ood": (run_ood, 60, 8),
}


def _table(rows, columns):
    header = "| model | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    lines += [f"| {row['name']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for row in rows]
    return lines


def to_markdown(result):
    info = result["info"]
    lines = [f"# Every kind of member ({info['device']}, {info['backend']}, Keras {info['keras']})", "",
             f"{result['members']} MLP members per task (hidden {HIDDEN}, seeds {result['seed']}..., early "
             f"stopping on validation, patience {PATIENCE}); {result['seconds']:.0f} s in all.", ""]
    for name, part in result["tasks"].items():
        lines += [f"## {name}: {part['task']}, at most {part['epochs']} epochs ({part['seconds']:.0f} s)", "",
                  "Epochs trained (early stopping): " + ", ".join(map(str, part["trained_epochs"])) + ".", ""]
        if part["task"] == "binary":
            lines += _table(part["rows"], ["accuracy", "auroc", "nll", "brier", "ece"])
        elif part["task"] == "regression":
            lines += _table(part["rows"], ["rmse", "mae", "nll", "coverage"])
            lines += ["", f"Variance scale fit on the validation split: s = {part['variance_scale']:.3f}."]
        else:
            rows = [{**row, **{f"{score} AUROC": row["ood"][score]["auroc"] for score in row["ood"]}}
                    for row in part["rows"]]
            lines += [f"{part['in_distribution']} test rows of digits 0-4, {part['out_of_distribution']} "
                      "of digits 5-9 (OOD).", ""]
            lines += _table(rows[:-1], ["accuracy", "nll", "ece", "max_prob AUROC", "entropy AUROC"])
            lines += ["", *_table(rows[-1:], ["accuracy", "nll", "ece", "max_prob AUROC", "entropy AUROC",
                                               "mutual_information AUROC"])]
        lines += ["", "Test NLL: " + "; ".join(f"{who} {value:.4f}" for who, value in part["nll"].items()) + "."]
        if "calibrated_nll" in part:
            cal = part["calibrated_nll"]
            lines += ["", f"After `ek.calibrate` on the validation split (each member and the ensemble): "
                          f"ensemble {cal['ensemble']:.4f}; best member {cal['best member']:.4f}; members "
                          + ", ".join(f"{v:.4f}" for v in cal["members"]) + "."]
        lines += [""] + [f"- {goal}: {'met' if met else 'NOT met'}" for goal, met in part["goals"].items()]
        lines += [""]
    return "\n".join(lines)


def run(quick=False, seed=0, tasks=tuple(TASKS), members=None, epochs=None):
    """Train, compose and score every task in ``tasks``; ``members``/``epochs`` override the defaults."""
    count = members or (3 if quick else 5)
    start = time.perf_counter()
    result = {"info": device_info(), "quick": quick, "members": count, "seed": seed, "tasks": {}}
    for name in tasks:
        runner, full_epochs, quick_epochs = TASKS[name]
        task_epochs = epochs or (quick_epochs if quick else full_epochs)
        task_start = time.perf_counter()
        part = runner(count, task_epochs, seed)
        task = {"breast_cancer": "binary", "diabetes": "regression"}.get(name, "multiclass + OOD")
        result["tasks"][name] = {"task": task, "epochs": task_epochs, **part,
                                 "seconds": time.perf_counter() - task_start}
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 members, short training")
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
