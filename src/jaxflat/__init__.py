"""jaxflat: a JAX model's parameters as one flat vector and back, its state
saved and restored. A port of Flux / Optimisers.jl's flat-and-nested toolkit.
"""

import importlib.metadata

from . import _nnx  # noqa: F401  (registers what jaxflat knows about Flax)
from . import curvature as curvature  # a public submodule, not in __all__
from ._checkpoint import load as load
from ._checkpoint import save as save
from ._destructure import LayoutEntry as LayoutEntry
from ._destructure import Restructure as Restructure
from ._destructure import clear_caches as clear_caches
from ._destructure import destructure as destructure
from ._errors import LoadError as LoadError
from ._modules import modules as modules
from ._predicates import isleaf as isleaf
from ._predicates import isnumeric as isnumeric
from ._predicates import register_leaf as register_leaf
from ._predicates import register_trainable as register_trainable
from ._predicates import trainable as trainable
from ._state import loadmodel as loadmodel
from ._state import state as state
from ._summary import summary as summary

try:
    __version__ = importlib.metadata.version("jaxflat")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"

__all__ = (
    "LayoutEntry",
    "LoadError",
    "Restructure",
    "clear_caches",
    "destructure",
    "isleaf",
    "load",
    "isnumeric",
    "loadmodel",
    "modules",
    "register_leaf",
    "register_trainable",
    "save",
    "state",
    "summary",
    "trainable",
)
