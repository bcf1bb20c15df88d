"""Every kind of member: binary, regression and OOD detection with ``ek.ensemble(..., uncertainty=True)``.

Run: ``python -m benchmarks.tasks [--quick]`` (1-2 minutes on 2 shared CPU cores; ``--quick``: 30 s).
Writes ``benchmarks/results/tasks.json`` and ``tasks.md`` (``--quick``: ``tasks_quick.*``).

Three tasks on scikit-learn's bundled data, 5 small MLP members each (member ``i``
seeded ``seed + i``), one fixed 60/20/20 train/validation/test split, inputs
standardised with the training rows' statistics:

- ``breast_cancer`` (binary): members end in ``Dense(1, sigmoid)``; members vs the
  mean ensemble on accuracy, AUROC, NLL, Brier and ECE (``ensemblekit.metrics``).
- ``diabetes`` (regression, standardised targets): members end in a linear unit;
  their Gaussian NLL uses one σ per member (its validation RMSE). The ensemble's
  ``std`` output (the members' spread) is scored as it is and after variance
  scaling by ``ek.calibrate``: one ``s`` fit on the validation split,
  ``s² = mean(((y - μ) / σ)²)``; NLL and coverage of μ ± 1.96·s·σ.
- ``digits_ood``: members trained on digits 0-4 (softmax over 5); the test rows of
  digits 5-9 are out of distribution (positives). OOD AUROC/AUPR/FPR95 of each
  member's max probability and entropy, and of the ensemble's mutual information.

Goals (reported, not asserted): the ensemble beats the best member on NLL in
each task; the ensemble's mutual-information OOD AUROC beats one member's
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
from ensemblekit._io import predict  # noqa: E402
from ensemblekit.bench.throughput import device_info, write_json_and_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOSSES = {"sigmoid": "binary_crossentropy", "softmax": "sparse_categorical_crossentropy", None: "mse"}


def mlp(features, units, activation, seed, hidden=32, learning_rate=3e-3):
    """A one-hidden-layer MLP with deterministic initial weights, compiled for its task."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dense(units, activation=activation)], name=f"mlp_{seed}")
    model.compile(keras.optimizers.Adam(learning_rate), LOSSES[activation])
    return model


def split(x, y, seed=0, standardise=True):
    """``{"train", "val", "test": (x, y)}``: a fixed 60/20/20 permutation, x standardised on train."""
    order = np.random.default_rng(seed).permutation(len(x))
    cuts = [int(0.6 * len(x)), int(0.8 * len(x))]
    parts = dict(zip(("train", "val", "test"), np.split(order, cuts), strict=True))
    mean, std = (x[parts["train"]].mean(0), x[parts["train"]].std(0) + 1e-8) if standardise else (0.0, 1.0)
    return {name: (((x[rows] - mean) / std).astype("float32"), y[rows]) for name, rows in parts.items()}


def train_members(data, units, activation, count, epochs, seed):
    x, y = data["train"]
    with demo.deterministic(seed):
        return [demo.fit_seeded(mlp(x.shape[1], units, activation, seed + i), x, y, epochs, seed + i,
                                batch_size=32) for i in range(count)]


def run_binary(count, epochs, seed=0):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    data = split(x, y.astype("int64"), seed)
    members = train_members(data, 1, "sigmoid", count, epochs, seed)
    (x_val, y_val), (x_test, y_test) = data["val"], data["test"]
    rows = [{"name": f"member {i}", **metrics.evaluate(m, x_test, y_test)} for i, m in enumerate(members)]
    model = ek.ensemble(members, task="binary", uncertainty=True)
    rows.append({"name": "ensemble (mean)", **metrics.evaluate(model, x_test, y_test)})
    val_nll = [metrics.evaluate(m, x_val, y_val)["nll"] for m in members]
    nll = nll_summary(rows[:-1], rows[-1], val_nll)
    calibrated = calibrated_nll(members, ek.ensemble(members, task="binary"), (x_val, y_val), (x_test, y_test))
    return {"rows": rows, "nll": nll, "calibrated_nll": calibrated, "goals": {
        "ensemble NLL < best member NLL (oracle: best on test)": nll["ensemble"] < nll["best member"],
        "ensemble NLL < member chosen on validation": nll["ensemble"] < nll["member chosen on validation"],
        "calibrated ensemble NLL < best calibrated member (oracle)":
            calibrated["ensemble"] < calibrated["best member"]}}


def calibrated_nll(members, ensemble, validation, test):
    """Test NLL after ``ek.calibrate`` on validation (Platt or temperature), for every member and the ensemble."""
    def nll(model):
        return metrics.evaluate(ek.calibrate(model, *validation), *test)["nll"]

    member_nll = [nll(m) for m in members]
    return {"ensemble": nll(ensemble), "best member": min(member_nll), "members": member_nll}


def nll_summary(member_rows, ensemble_row, val_nll):
    """Test NLL of the ensemble, the best member (chosen on test), the member chosen on validation, the mean member."""
    test_nll = [row["nll"] for row in member_rows]
    return {"ensemble": ensemble_row["nll"], "best member": min(test_nll),
            "member chosen on validation": test_nll[int(np.argmin(val_nll))],
            "mean member": float(np.mean(test_nll))}


def homoscedastic(val_prediction, y_val, test_prediction, y_test):
    """Regression metrics on test and validation with one σ for all rows: the validation RMSE."""
    sigma = metrics.rmse(val_prediction, y_val)
    return [metrics.score_task(p, y, "regression", std=np.full(np.shape(p), sigma))
            for p, y in ((test_prediction, y_test), (val_prediction, y_val))]


def run_regression(count, epochs, seed=0):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    y = y[:, None]
    data = split(x, y, seed)
    y_mean, y_std = data["train"][1].mean(), data["train"][1].std()
    data = {name: (xs, ((ys - y_mean) / y_std).astype("float32")) for name, (xs, ys) in data.items()}
    members = train_members(data, 1, None, count, epochs, seed)
    (x_val, y_val), (x_test, y_test) = data["val"], data["test"]
    rows, val_nll = [], []
    for i, member in enumerate(members):
        row, val_row = homoscedastic(predict(member, x_val), y_val, predict(member, x_test), y_test)
        rows.append({"name": f"member {i} (σ = validation RMSE)", **row})
        val_nll.append(val_row["nll"])
    model = ek.ensemble(members, task="regression", uncertainty=True)
    val, test = metrics.predict_outputs(model, x_val), metrics.predict_outputs(model, x_test)
    rows.append({"name": "ensemble (σ = validation RMSE)",
                 **homoscedastic(val["prediction"], y_val, test["prediction"], y_test)[0]})
    rows.append({"name": "ensemble (σ = member std)", **metrics.evaluate(model, x_test, y_test)})
    calibrated = ek.calibrate(model, x_val, y_val)  # variance scaling: std -> s · std
    scale = calibrated.layers[-1].scale
    rows.append({"name": f"ensemble (σ = {scale:.2f} × member std, ek.calibrate)",
                 **metrics.evaluate(calibrated, x_test, y_test)})
    nll = nll_summary(rows[:count], rows[-1], val_nll)
    same_sigma = rows[count]["nll"]  # the ensemble with the members' σ rule (validation RMSE)
    return {"rows": rows, "variance_scale": scale, "nll": nll, "goals": {
        "ensemble NLL (scaled std) < best member NLL (oracle: best on test)": nll["ensemble"] < nll["best member"],
        "ensemble NLL (σ = validation RMSE, as the members) < member chosen on validation":
            same_sigma < nll["member chosen on validation"],
        "coverage within 0.03 of 0.95 after scaling": abs(rows[-1]["coverage"] - 0.95) <= 0.03,
    }}


def run_ood(count, epochs, seed=0, known=5):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = split(x / 16.0, y.astype("int64"), seed, standardise=False)  # rare pixels: tiny train std
    inside = {name: (xs[ys < known], ys[ys < known]) for name, (xs, ys) in data.items()}
    x_ood = data["test"][0][data["test"][1] >= known]
    members = train_members(inside, known, "softmax", count, epochs, seed)
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
    return {"rows": rows, "nll": nll, "calibrated_nll": calibrated, "in_distribution": len(x_test),
            "out_of_distribution": len(x_ood), "goals": goals}


TASKS = {
    # name: (runner, epochs, quick epochs)
    "breast_cancer": (run_binary, 40, 10),
    "diabetes": (run_regression, 60, 15),
    "digits_ood": (run_ood, 30, 8),
}


def _table(rows, columns):
    header = "| model | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    lines += [f"| {row['name']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for row in rows]
    return lines


def to_markdown(result):
    info = result["info"]
    lines = [f"# Every kind of member ({info['device']}, {info['backend']}, Keras {info['keras']})", "",
             f"{result['members']} MLP members per task; {result['seconds']:.0f} s in all.", ""]
    for name, part in result["tasks"].items():
        lines += [f"## {name}: {part['task']}, {part['epochs']} epochs", ""]
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
    result = {"info": device_info(), "quick": quick, "members": count, "tasks": {}}
    for name in tasks:
        runner, full_epochs, quick_epochs = TASKS[name]
        task_epochs = epochs or (quick_epochs if quick else full_epochs)
        part = runner(count, task_epochs, seed)
        task = {"breast_cancer": "binary", "diabetes": "regression"}.get(name, "multiclass + OOD")
        result["tasks"][name] = {"task": task, "epochs": task_epochs, **part}
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
