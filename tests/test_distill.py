"""ek.distill: the loss against numpy, unlabelled data, augmentation, saving, bad input, real data."""

import keras
import numpy as np
import pytest
from scipy import special

import ensemblekit as ek
from ensemblekit.datasets import load_digits
from tests.conftest import make_mlp


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(48, 8)).astype("float32"), rng.integers(0, 3, 48)


def _numpy_loss(teacher_log_probs, student_logits, y, temperature, alpha):
    """alpha * CE(y, student) + (1 - alpha) * T² * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    teacher = special.softmax(teacher_log_probs / temperature, axis=1)
    student = special.softmax(student_logits / temperature, axis=1)
    kl = np.mean(np.sum(teacher * (np.log(teacher) - np.log(student)), axis=1)) * temperature**2
    ce = np.mean(-special.log_softmax(student_logits, axis=1)[np.arange(len(y)), y])
    return alpha * ce + (1 - alpha) * kl, kl


@pytest.mark.parametrize("cache_teacher", [True, False])
def test_loss_equals_numpy_reference(data, cache_teacher):
    x, y = data
    members = [make_mlp(1, softmax=True), make_mlp(2)]  # one outputs probabilities, one logits
    student = make_mlp(3)
    teacher_probs = np.mean([special.softmax(members[1].predict(x, verbose=0), axis=1),
                             members[0].predict(x, verbose=0)], axis=0)
    expected, kl = _numpy_loss(np.log(teacher_probs), student.predict(x, verbose=0), y, 2.0, 0.3)
    _, report = ek.distill(members, student, x, y, temperature=2.0, alpha=0.3, epochs=1,
                           batch_size=len(x), optimizer=keras.optimizers.SGD(0.0),
                           cache_teacher=cache_teacher, verbose=0)
    assert report.teacher_cached is cache_teacher
    np.testing.assert_allclose(report.history["loss"][0], expected, rtol=1e-4)
    np.testing.assert_allclose(report.history["distillation_loss"][0], kl, rtol=1e-4)


def test_unlabelled_data_moves_the_student_towards_the_teacher(data):
    x, _ = data
    teacher = make_mlp(1)
    student, report = ek.distill(teacher, make_mlp(2), x, None, epochs=30, batch_size=16,
                                 optimizer=keras.optimizers.Adam(0.02), verbose=0)
    assert report.alpha == 0.0
    losses = report.history["distillation_loss"]
    assert losses[-1] < 0.5 * losses[0]
    agree = np.mean(student.predict(x, verbose=0).argmax(1) == teacher.predict(x, verbose=0).argmax(1))
    assert agree >= 0.9


def test_augmentation_runs_the_teacher_on_the_same_view_each_batch(data):
    x, y = data
    teacher = make_mlp(1)
    noise = keras.layers.GaussianNoise(1.0, seed=0)  # as large as x: different views would disagree
    _, report = ek.distill(teacher, teacher, x, y, alpha=0.0, epochs=2, augment=noise,
                           optimizer=keras.optimizers.SGD(0.0), verbose=0)
    assert not report.teacher_cached and "augment" in report.cache_reason
    assert max(report.history["distillation_loss"]) < 1e-5  # a copy of the teacher, same inputs
    with pytest.raises(ValueError, match="cache_teacher=True with augment"):
        ek.distill(teacher, teacher, x, y, augment=noise, cache_teacher=True, verbose=0)


def test_student_is_a_copy_that_saves_and_loads_and_the_teacher_never_changes(data, tmp_path):
    x, y = data
    members = [make_mlp(1), make_mlp(2)]
    given = make_mlp(3)
    before = [m.get_weights() for m in (*members, given)]
    student, _ = ek.distill(members, given, x, y, epochs=2, verbose=0)
    for model, weights in zip((*members, given), before, strict=True):
        for a, b in zip(model.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(student.get_weights(), before[2], strict=True))
    path = tmp_path / "student.keras"
    student.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-6)


def test_width_narrows_the_student_and_fresh_reinitialises(data):
    x, y = data
    member = make_mlp(1, hidden=32)
    student, report = ek.distill([member, make_mlp(2, hidden=32)], member, x, y, width=0.5, epochs=1,
                                 verbose=0)
    assert student.get_layer("hidden").units == 16
    assert report.student_params < member.count_params()
    fresh, _ = ek.distill(member, member, x, y, init="fresh", epochs=1, verbose=0,
                          optimizer=keras.optimizers.SGD(0.0))
    assert not np.allclose(fresh.get_weights()[0], member.get_weights()[0])


def test_bad_input_gets_one_clear_error(data):
    x, y = data
    teacher = make_mlp(1)
    with pytest.raises(ValueError, match=r"outputs \(None, 3\) but student .* outputs \(None, 4\)"):
        ek.distill(teacher, make_mlp(2, classes=4), x, y, verbose=0)
    with pytest.raises(ValueError, match="x is empty"):
        ek.distill(teacher, make_mlp(2), x[:0], y[:0], verbose=0)
    for kwargs, message in [({"temperature": 0}, "temperature must be a positive number"),
                            ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
                            ({"epochs": 0}, "epochs must be a positive integer"),
                            ({"width": 0.0}, r"width must be in \(0, 1\]"),
                            ({"cache_teacher": "yes"}, "cache_teacher must be")]:
        with pytest.raises(ValueError, match=message):
            ek.distill(teacher, make_mlp(2), x, y, verbose=0, **kwargs)
    with pytest.raises(ValueError, match="y has 3 labels but x has 48 samples"):
        ek.distill(teacher, make_mlp(2), x, y[:3], verbose=0)


@pytest.mark.slow
def test_distilled_student_beats_the_labels_only_student_on_digits():
    """Real data: the ensemble's soft targets teach more than the labels at the same budget."""
    (x, y), (x_test, y_test) = load_digits()
    x, y, x_unlabelled = x[:300], y[:300], x[300:]

    def member(seed, hidden):
        model = make_mlp(seed, input_shape=(8, 8, 1), classes=10, hidden=hidden)
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=60, batch_size=32, verbose=0)
        return model

    members = [member(seed, 64) for seed in range(5)]
    teacher = ek.ensemble(members, "mean")
    labels_only = member(10, 8)
    keras.utils.set_random_seed(10)
    fresh = make_mlp(10, input_shape=(8, 8, 1), classes=10, hidden=8)
    # Same student, same epochs; the distilled one also sees the unlabelled rest through the teacher.
    student, _ = ek.distill(teacher, fresh, np.concatenate([x, x_unlabelled]), None, epochs=60,
                            batch_size=32, temperature=2.0, optimizer=keras.optimizers.Adam(3e-3),
                            verbose=0)
    scores = {name: ek.evaluate(model, x_test, y_test) for name, model in
              [("labels", labels_only), ("distilled", student), ("teacher", teacher)]}
    assert scores["distilled"]["nll"] < scores["labels"]["nll"]
    assert scores["distilled"]["accuracy"] > scores["labels"]["accuracy"]


# --- per task (issue "every kind of member") ---

def _task_mlp(units, activation, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(units, activation=activation)], name=f"task_mlp_{seed}")


def test_distill_binary_matches_the_teachers_bernoulli_targets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    teachers = [_task_mlp(1, "sigmoid", seed) for seed in range(3)]
    target = ek.ensemble(teachers).predict(x, verbose=0)
    student = _task_mlp(1, "sigmoid", 9)
    before = np.abs(student.predict(x, verbose=0) - target).mean()
    trained, report = ek.distill(teachers, student, x, epochs=30, temperature=1.0, verbose=0)
    after = np.abs(trained.predict(x, verbose=0) - target).mean()
    assert after < 0.5 * before
    assert report.teacher == "packed ensemble" and report.alpha == 0.0


def test_distill_regression_matches_the_ensemble_mean_and_uses_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 6)).astype("float32")
    teachers = [_task_mlp(2, None, seed) for seed in range(3)]
    target = ek.ensemble(teachers, task="regression").predict(x, verbose=0)
    student = _task_mlp(2, None, 9)
    before = np.mean((student.predict(x, verbose=0) - target) ** 2)
    trained, report = ek.distill(teachers, student, x, target, task="regression", epochs=30,
                                 batch_size=32, verbose=0)
    assert np.mean((trained.predict(x, verbose=0) - target) ** 2) < 0.5 * before
    assert report.alpha == 0.5 and len(report.history["loss"]) == 30


def test_distill_refuses_mismatched_tasks():
    x = np.zeros((8, 6), "float32")
    with pytest.raises(ValueError, match="is a multiclass model but student .* is multilabel"):
        ek.distill(_task_mlp(3, "softmax", 1), _task_mlp(3, "sigmoid", 2), x, verbose=0)
    with pytest.raises(ValueError, match="cannot be told; pass task="):
        ek.distill(_task_mlp(1, None, 1), _task_mlp(1, None, 2), x, verbose=0)
