"""Deploy a composed model: verified SavedModel/ONNX export and an HTTP prediction service.

Example:
    >>> import ensemblekit as ek
    >>> sorted(name for name in ("export", "serve", "running") if hasattr(ek.deploy, name))
    ['export', 'running', 'serve']
"""

from ensemblekit.deploy.batching import MicroBatcher
from ensemblekit.deploy.export import export
from ensemblekit.deploy.models_config import load_models_config
from ensemblekit.deploy.serve import Service, build_app, running, serve

__all__ = ["MicroBatcher", "Service", "build_app", "export", "load_models_config", "running", "serve"]
