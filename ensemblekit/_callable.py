"""Packages that can be called like their main function: ``ek.merge(...)`` and ``ek.pack(...)``.

``ensemblekit.merge`` and ``ensemblekit.pack`` are packages (``import
ensemblekit.merge.core`` works, ``ek.merge.align`` is there) and also what most
users call: ``ek.merge(models, "ties")``. Re-exporting the functions under the
packages' own names would replace the packages in ``ensemblekit``'s namespace,
so the packages themselves forward calls to their function instead.
"""

from __future__ import annotations

import functools
import sys
import types


class CallablePackage(types.ModuleType):
    """A package module whose call runs its main function (``__wrapped__``)."""

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def make_callable(package_name, function):
    """Make the (already imported) package ``package_name`` call ``function`` when called.

    Example:
        >>> import ensemblekit as ek
        >>> callable(ek.merge), ek.merge.__wrapped__ is ek.merge.merge
        (True, True)
    """
    package = sys.modules[package_name]
    package.__class__ = CallablePackage
    package.__wrapped__ = function
    functools.update_wrapper(package, function, assigned=(), updated=())
    return package
