import pytest

from ensemblekit.merge.methods import get_method, resolve_per_layer


def test_resolve_per_layer_first_matching_pattern_then_default():
    resolved = resolve_per_layer(
        {"t": {"d1/*": 0.1, "*kernel": 0.2, "default": 0.9}, "lambda_": 2.0},
        ["d1/kernel", "d2/kernel", "d2/bias"],
    )
    assert [r["t"] for r in resolved] == [0.1, 0.2, 0.9]
    assert all(r["lambda_"] == 2.0 for r in resolved)


def test_resolve_per_layer_star_is_a_fallback_too():
    assert resolve_per_layer({"t": {"x/*": 1.0, "*": 0.0}}, ["x/k", "y/k"]) == [{"t": 1.0}, {"t": 0.0}]


def test_resolve_per_layer_without_default_names_the_weight():
    with pytest.raises(ValueError, match=r"t: weight 'd2/kernel' matches none.*no 'default'"):
        resolve_per_layer({"t": {"d1/*": 0.1}}, ["d1/kernel", "d2/kernel"])


def test_resolve_per_layer_rejects_a_pattern_matching_nothing():
    with pytest.raises(ValueError, match=r"t\['dens\*'\] matches no weight"):
        resolve_per_layer({"t": {"dens*": 0.1, "default": 0.5}}, ["d1/kernel"])


def test_check_params_names_key_of_bad_per_layer_value():
    with pytest.raises(ValueError, match=r"density\['d1/\*'\] is 1.5; it must be in \(0.0, 1.0\]"):
        get_method("ties").check_params({"density": {"d1/*": 1.5, "default": 0.2}})


def test_check_params_unknown_parameter_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'lambda'.*accepts: density, lambda_"):
        get_method("ties").check_params({"lambda": 0.5})


def test_check_params_type_errors_name_the_parameter():
    with pytest.raises(TypeError, match="normalize must be True or False"):
        get_method("linear").check_params({"normalize": "yes"})
    with pytest.raises(TypeError, match="t must be a number"):
        get_method("slerp").check_params({"t": "half"})
