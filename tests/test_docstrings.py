"""The ``>>>`` examples of every module run as written; every public name has one."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import ensemblekit as ek

MODULES = ["ensemblekit"] + sorted(
    info.name for info in pkgutil.walk_packages(ek.__path__, "ensemblekit.")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _doctests(obj, name, recurse=True):
    """The docstrings with examples that ``doctest`` finds on ``obj`` (defined in its module)."""
    finder = doctest.DocTestFinder(recurse=recurse, exclude_empty=True)
    return [test for test in finder.find(obj, name) if test.examples]


def _public_names():
    """``ek.__all__`` plus the public names of ``ek.prune`` and ``ek.deploy``."""
    return ([(f"ek.{n}", getattr(ek, n)) for n in ek.__all__]
            + [(f"ek.prune.{n}", getattr(ek.prune, n)) for n in ek.prune.__all__]
            + [(f"ek.deploy.{n}", getattr(ek.deploy, n)) for n in ek.deploy.__all__])


def test_walk_finds_the_package_modules():
    assert {"ensemblekit", "ensemblekit.compose.ensemble", "ensemblekit.prune.magnitude",
            "ensemblekit.merge.methods.slerp", "ensemblekit.deploy.serve"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    for test in _doctests(module, module_name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("name, obj", _public_names(), ids=[n for n, _ in _public_names()])
def test_every_public_name_has_an_example(name, obj):
    examples = sum(len(t.examples) for t in _doctests(obj, name, recurse=False))
    assert examples > 0, f"{name} has no >>> example in its docstring"
    if not inspect.ismodule(obj):
        summary = inspect.getdoc(obj).splitlines()[0]
        assert summary.strip() and not summary.startswith(" "), f"{name}: no one-line summary"
