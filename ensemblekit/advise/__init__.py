"""``ek.advise``: merge or ensemble? Measure every option on held-out data, then recommend one.

The advisor splits the validation data into a *fit* half and a *score* half,
measures the loss barrier on the linear path between members (before and after
``ek.align``; ``ensemblekit.merge.loss_barrier``), builds every applicable
candidate from the registry of compositions (``ensemblekit.compositions``: best
member, soups, TIES, output ensembles, calibrated / weighted / greedy / packed /
budget-pruned ensembles), scores each on the score half with
:mod:`ensemblekit.metrics`, costs each (:mod:`ensemblekit.costs`: parameters,
MACs, measured latency) and recommends the best one within a budget, preferring
the cheaper of two candidates that score alike. Members may be multiclass,
binary or multilabel classifiers (NLL first — for multilabel the mean per-label
binary NLL, every metric a macro mean over labels; Platt scaling for a binary or
multilabel ensemble) or regressors (RMSE first; loss barriers in MSE).

Modules: ``core`` (the flow, :class:`Advice`), ``recommend`` (the choice),
``table`` (``str(advice)``), ``cli`` (``ensemblekit advise``). This package is
callable: ``ensemblekit.advise(models, x_val, y_val)`` runs :func:`advise`.

Example:
    >>> from ensemblekit.advise import CANDIDATES, MERGES
    >>> list(CANDIDATES)[:4], MERGES
    (['best_member', 'soup', 'aligned_soup', 'ties'], ('soup', 'aligned_soup', 'ties'))
"""

from ensemblekit._callable import make_callable
from ensemblekit.advise.core import (
    CANDIDATES,
    MERGES,
    METRICS,
    ROW_KEYS,
    TASK_METRICS,
    TASK_ROW_KEYS,
    Advice,
    advise,
    split_indices,
)
from ensemblekit.advise.recommend import TOLERANCE, recommend

__all__ = ["CANDIDATES", "MERGES", "METRICS", "ROW_KEYS", "TASK_METRICS", "TASK_ROW_KEYS", "TOLERANCE", "Advice",
           "advise", "recommend", "split_indices"]

make_callable(__name__, advise)
