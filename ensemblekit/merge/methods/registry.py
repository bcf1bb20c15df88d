"""Merge methods by name, mergekit-style."""

from __future__ import annotations

from ensemblekit._validate import check_choice
from ensemblekit.merge.methods.dare import Dare, DareTies
from ensemblekit.merge.methods.greedy_soup import GreedySoup
from ensemblekit.merge.methods.linear import Linear
from ensemblekit.merge.methods.slerp import Slerp
from ensemblekit.merge.methods.task_arithmetic import TaskArithmetic
from ensemblekit.merge.methods.ties import Ties

METHODS = {
    cls.name: cls
    for cls in (Linear, TaskArithmetic, Ties, Dare, DareTies, Slerp, GreedySoup)
}


def get_method(name):
    """A fresh instance of the merge method called ``name``.

    Example:
        >>> get_method("ties").parameters["density"].default
        0.2
    """
    check_choice(name, tuple(METHODS), "merge method")
    return METHODS[name]()
