"""ensemblekit.compositions: the one registry of compositions read by advise, the demo and the benchmark."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import compositions
from ensemblekit.compositions import REGISTRY, Context, Skip, build
from tests.conftest import make_mlp, train_mlp


@pytest.fixture(scope="module")
def members(toy_data):
    x, y = toy_data
    return [train_mlp(seed, x, y, epochs=3, learning_rate=1e-2) for seed in range(3)]


@pytest.fixture()
def ctx(members, toy_data):
    x, y = toy_data
    return Context(members, x[:100], y[:100], x_train=x[100:], y_train=y[100:],
                   settings={"fuse_epochs": 1, "finetune_epochs": 1, "stack_epochs": 2, "stack_cv": 2})


def test_every_entry_is_data_with_a_kind_requirements_and_a_note():
    assert list(REGISTRY) == [entry.name for entry in REGISTRY.values()]
    for name, entry in REGISTRY.items():
        assert entry.kind in compositions.KINDS, name
        assert set(entry.requires) <= set(compositions.REQUIREMENTS), name
        assert entry.note and callable(entry.builder), name
    assert sorted(sum((compositions.names(kind) for kind in compositions.KINDS), [])) == sorted(REGISTRY)
    assert compositions.names("merge") == ["soup", "aligned_soup", "ties"]
    assert REGISTRY["ties"].requires == ("one_architecture", "base")
    assert REGISTRY["packed_mean"].requires == ("one_architecture", "one_output_kind")


def test_the_advisor_the_demo_and_the_benchmark_read_the_registry():
    from ensemblekit import demo
    from ensemblekit.advise import CANDIDATES
    from ensemblekit.bench import accuracy

    for selection in (CANDIDATES, demo.COMPOSITIONS, accuracy.COMPOSITIONS):
        assert set(selection.values()) <= set(REGISTRY)
    # one entry, three labels: the same composition everywhere
    assert CANDIDATES["greedy"] == demo.COMPOSITIONS["select (Caruana)"] == \
        accuracy.COMPOSITIONS["select (Caruana)"] == "greedy"


def test_unknown_names_settings_and_kinds_are_one_line_errors(members, toy_data):
    x, y = toy_data
    with pytest.raises(ValueError, match=r"Unknown composition 'soop'; expected one of best_member, "):
        compositions.get("soop")
    with pytest.raises(ValueError, match=r"Unknown kind 'merges'; expected one of member, ensemble"):
        compositions.names("merges")
    with pytest.raises(ValueError, match=r"Unknown setting 'fuse_epoch'; expected one of best_member_metric"):
        Context(members, x, y, settings={"fuse_epoch": 1})
    with pytest.raises(ValueError, match=r"Unknown bn_data 'val'"):
        Context(members, x, y, bn_data="val")
    with pytest.raises(ValueError, match=r"compositions needs at least 2 members, got 1"):
        Context(members[:1], x, y)
    with pytest.raises(ValueError, match=r"y_fit has 199 labels but x has 200 samples"):
        Context(members, x, y[:-1])


def test_requirements_skip_with_the_reason(members, toy_data):
    x, y = toy_data
    other = train_mlp(7, x, y, epochs=1, hidden=24)
    mixed = Context([members[0], other], x, y)
    for name in ("soup", "aligned_soup", "ties", "packed_mean", "packed_logit_mean"):
        with pytest.raises(Skip, match=r"^members differ in architecture: member 1 .*\(\+\d+ more\)$"):
            build(name, mixed)
        assert REGISTRY[name].why_not(mixed).startswith("members differ in architecture")
    plain = Context(members, x, y)
    cases = {"ties": "needs base= (task vectors are differences from a base model)",
             "pruned_members": "no budget given",
             "fuse_concat": "needs the members' training data (x_train, y_train) to train its new part",
             "pruned_channels": "needs the members' training data (x_train, y_train) to train its new part"}
    for name, reason in cases.items():
        with pytest.raises(Skip) as skipped:
            build(name, plain)
        assert str(skipped.value) == reason
    kinds = Context([members[0], make_mlp(1, softmax=True)], x, y)
    with pytest.raises(Skip, match="^members mix logit and probability outputs$"):
        build("packed_mean", kinds)
    with pytest.raises(Skip, match="^budget 3 covers all 3 members$"):
        build("pruned_members", Context(members, x, y, budget=3))


def test_output_ensembles_equal_ek_ensemble_and_builds_are_done_once(ctx, members, toy_data):
    x, _ = toy_data
    for method in compositions.ENSEMBLE_METHODS:
        built = build(f"ensemble_{method}", ctx)
        assert built.used == [0, 1, 2] and built.note == compositions.ENSEMBLE_NOTES[method]
        np.testing.assert_allclose(built.model.predict(x, verbose=0),
                                   ek.ensemble(members, method).predict(x, verbose=0), atol=1e-6)
    assert build("ensemble_mean", ctx) is build("ensemble_mean", ctx)
    calibrated = build("calibrated_mean", ctx)
    assert calibrated.model.layers[1] is build("ensemble_mean", ctx).model  # calibrates the built ensemble
    temperature = float(ek.calibrate(ek.ensemble(members, "mean"), ctx.x_fit, ctx.y_fit).layers[-1].temperature)
    assert calibrated.note == f"ensemble, temperature {temperature:.3g} fitted on the validation split"


def test_best_member_is_the_lowest_fit_metric(ctx, members):
    built = build("best_member", ctx)
    nlls = [ek.evaluate(m, ctx.x_fit, ctx.y_fit)["nll"] for m in members]
    assert built.used == [int(np.argmin(nlls))] and built.model is members[built.used[0]]
    assert built.note == f"member {built.used[0]} ('{built.model.name}'), best validation-split nll"


def test_greedy_and_weighted_pay_only_for_the_members_they_use(ctx, members, toy_data):
    x, _ = toy_data
    chosen = ek.select(members, ctx.x_fit, ctx.y_fit)
    counts = np.bincount(chosen, minlength=3)
    greedy = build("greedy", ctx)
    assert greedy.used == [int(i) for i in np.flatnonzero(counts)]
    full = ek.ensemble(members, "weighted", weights=counts.tolist())
    # one member chosen: that member itself (logits); several: their weighted ensemble (probabilities)
    np.testing.assert_allclose(compositions.call_probs(greedy.model, x), full.predict(x, verbose=0), atol=1e-6)
    weights = ek.optimize_weights(members, ctx.x_fit, ctx.y_fit)
    weighted = build("weighted", ctx)
    assert weighted.used == [i for i in range(3) if weights[i] >= compositions.SETTINGS["min_weight"]]
    assert weighted.note.startswith("mean of probabilities, member weights {")


def test_pruned_members_stays_within_the_budget_in_mean_member_costs(members, toy_data):
    x, y = toy_data
    ctx = Context(members, x, y, budget=1.0, cost=[1.0, 2.0, 3.0])
    built = build("pruned_members", ctx)
    assert sum([1.0, 2.0, 3.0][i] for i in built.used) <= 2.0  # 1.0 x the mean cost of 2
    assert built.note.endswith("kept under the budget, chosen on the validation split")


def test_merges_and_alignment(ctx, members, toy_data):
    x, _ = toy_data
    soup = build("soup", ctx)
    assert soup.used is None and soup.note == "uniform average of the weights"
    np.testing.assert_allclose(soup.model.predict(x, verbose=0),
                               ek.merge(members, "linear").predict(x, verbose=0), atol=1e-6)
    aligned = build("aligned_soup", ctx)
    assert aligned.note == "weight matching to member 0, then uniform average of the weights"
    assert ctx.aligned() is ctx.aligned() and ctx.aligned()[0] is members[0]
    ties = build("ties", Context(members, ctx.x_fit, ctx.y_fit, base=members[0]))
    assert ties.note == "TIES from base (density 0.2)" and ties.model.count_params() == members[0].count_params()


def test_merges_reset_batchnorm_on_the_chosen_data(toy_data):
    x, y = toy_data
    bn = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        bn.append(keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                    keras.layers.Dense(3)]))
    fit = Context(bn, x[:50], y[:50], x_train=x[50:], y_train=y[50:], bn_data="fit", fit_data="fit half")
    assert build("soup", fit).note.endswith("; BatchNorm statistics reset on the fit half")
    train = Context(bn, x[:50], y[:50], x_train=x[50:], y_train=y[50:], bn_data="train")
    soup = build("soup", train)
    assert soup.note.endswith("; BatchNorm statistics reset on the training data")
    layer = next(bn for bn in soup.model.layers if isinstance(bn, keras.layers.BatchNormalization))
    hidden = keras.Model(soup.model.inputs[0], layer.input)(x[50:], training=False)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), np.mean(np.asarray(hidden), axis=0), atol=1e-4)


def test_trained_compositions_build_with_the_context_settings(ctx, members):
    stacked = build("stack_logistic", ctx)
    assert stacked.used is None and "cv=2 on the validation split" in stacked.note
    fused = build("fuse_concat", ctx)
    assert fused.note == "head trained 1 epochs on frozen penultimate features"
    assert fused.model.output_shape == (None, 3)
    pruned = build("pruned_channels", ctx)
    assert pruned.model.count_params() < ek.ensemble(members).count_params()


def test_skip_errors_turn_into_skips_once(members, toy_data):
    x, y = toy_data

    def failing(ctx):
        raise ValueError("unsupported layer 'x'\nmore detail")

    REGISTRY["_failing"] = compositions.Composition("_failing", "merge", failing, note="test only")
    try:
        with pytest.raises(ValueError, match="unsupported layer"):
            build("_failing", Context(members, x, y))
        lenient = Context(members, x, y, skip_errors=(ValueError,))
        with pytest.raises(Skip, match=r"^unsupported layer 'x'$"):
            build("_failing", lenient)
        results = list(compositions.build_each({"label": "_failing"}, lenient))
        assert [(label, str(result)) for label, _, result in results] == [("label", "unsupported layer 'x'")]
    finally:
        del REGISTRY["_failing"]


@pytest.fixture(scope="module")
def binary_members(toy_data):
    x, y = toy_data
    labels = (y > 0).astype("int64")
    return _sigmoid_mlps(x, labels, 1), x, labels


def _sigmoid_mlps(x, targets, units):
    """Two MLPs (seeds 0, 1) ending in ``Dense(units, sigmoid)``, 3 epochs of binary cross-entropy."""
    members = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(8, "relu"),
                                  keras.layers.Dense(units, activation="sigmoid")])
        model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
        model.fit(x, targets, epochs=3, verbose=0)
        members.append(model)
    return members


def test_binary_context_builds_each_composition_as_its_task_analogue(binary_members):
    members, x, labels = binary_members
    ctx = Context(members, x[:100], labels[:100], budget=1.0)
    assert ctx.task == "binary" and ctx.metric == "nll" and ctx.fit_probs().shape == (100, 2)
    ensemble = build("ensemble_logit_mean", ctx)
    assert ensemble.note == "sigmoid of the mean logits"
    expected = ek.ensemble(members, "logit_mean", task="binary")
    np.testing.assert_allclose(np.asarray(ensemble.model(x[100:])), np.asarray(expected(x[100:])), atol=1e-6)
    assert "Platt scaling" in build("calibrated_logit_mean", ctx).note
    best = build("best_member", ctx).used[0]
    fit_nll = [ek.evaluate(m, x[:100], labels[:100])["nll"] for m in members]
    assert best == int(np.argmin(fit_nll))
    assert build("pruned_members", ctx).used == [best]  # budget 1.0: one member, the best by greedy NLL
    with pytest.raises(Skip, match="multiclass members only; these are binary"):
        build("stack_logistic", ctx)


def test_regression_context_averages_values_and_skips_votes(toy_data):
    x, y = toy_data
    values = (x[:, 0] + x[:, 1]).astype("float32")
    members = [keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(1)]) for _ in range(2)]
    ctx = Context(members, x[:100], values[:100], task="regression")
    assert ctx.metric == "rmse" and ctx.y_fit.shape == (100, 1)
    mean = build("ensemble_logit_mean", ctx).model(x[:5])
    expected = (np.asarray(members[0](x[:5])) + np.asarray(members[1](x[:5]))) / 2
    np.testing.assert_allclose(np.asarray(mean), expected, atol=1e-6)
    with pytest.raises(Skip, match="a vote needs class decisions"):
        build("ensemble_vote", ctx)
    calibrated = build("calibrated_logit_mean", ctx)
    assert "variance scaling" in calibrated.note
    assert sorted(calibrated.model(x[:5])) == ["prediction", "std"]
    with pytest.raises(ValueError, match=r"^Unknown metric 'nll' for regression members; expected one of 'rmse', "
                                         r"'mae'\.$"):
        Context(members, x[:100], values[:100], task="regression", metric="nll")
    pruned = build("pruned_members", Context(members, x[:100], values[:100], task="regression", budget=1.0))
    mse = [np.mean((np.asarray(m(x[:100]))[:, 0] - values[:100]) ** 2) for m in members]
    assert pruned.used == [int(np.argmin(mse))]  # budget 1.0: the member with the lower fit-data MSE
    assert pruned.note.endswith("kept under the budget, chosen on the validation split")


@pytest.fixture(scope="module")
def multilabel_members(toy_data):
    """Two MLPs with three sigmoid units (x0 > 0, x1 > 0.5, x2 > 0): multilabel members."""
    x, _ = toy_data
    targets = np.stack([x[:, 0] > 0, x[:, 1] > 0.5, x[:, 2] > 0], axis=1).astype("float32")
    return _sigmoid_mlps(x, targets, 3), x, targets


def test_multilabel_context_scores_each_label_and_fits_with_the_one_task_loss(multilabel_members):
    from ensemblekit import metrics

    members, x, targets = multilabel_members
    ctx = Context(members, x[:100], targets[:100], budget=1.0)
    assert ctx.task == "multilabel" and ctx.metric == "nll" and ctx.fit_probs().shape == (100, 2, 3)
    fit_nll = [metrics.multilabel_metrics(np.asarray(m(x[:100])), targets[:100])["nll"] for m in members]
    best = build("best_member", ctx).used[0]
    assert best == int(np.argmin(fit_nll))
    assert build("ensemble_logit_mean", ctx).note == "sigmoid of each label's mean logit"
    assert "Platt scaling shared by the labels" in build("calibrated_logit_mean", ctx).note
    assert build("greedy", ctx).used == sorted(set(ek.select(members, x[:100], targets[:100])))
    assert build("pruned_members", ctx).used == [best]  # budget 1.0: the member with the lower fit NLL
    weighted = build("weighted", ctx)
    p = compositions.call_predictions(weighted.model, x[100:], "multilabel")[0]
    assert p.shape == (len(x) - 100, 3) and 0 < p.min() and p.max() < 1
    with pytest.raises(Skip, match="^multiclass members only; these are multilabel$"):
        build("stack_logistic", ctx)
    with pytest.raises(Skip, match="^ek.distill takes multiclass, binary, regression teachers; these members are "
                                   "multilabel$"):
        build("distilled_student", Context(members, x[:100], targets[:100], x_train=x[100:]))
    with pytest.raises(ValueError, match=r"^Unknown metric 'rmse' for multilabel members; expected one of 'nll', "):
        Context(members, x[:100], targets[:100], metric="rmse")
    by_auroc = Context(members, x[:100], targets[:100], metric="auroc")
    fit_auroc = [metrics.multilabel_metrics(np.asarray(m(x[:100])), targets[:100])["auroc"] for m in members]
    assert build("best_member", by_auroc).used == [int(np.argmax(fit_auroc))]
