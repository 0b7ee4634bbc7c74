"""The optional dependencies of ``aoti_rt.llm``: imported on first use, a missing one is a
:class:`MissingExtraError` that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

_HINT = "pip install 'aoti_rt[llm]'"


def require(name: str) -> ModuleType:
    """Import ``name`` (transformers, torchao or one of their submodules), or raise
    :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = name.split(".")[0]
        raise MissingExtraError(f"aoti_rt.llm needs {top} ({type(e).__name__}: {e}); install the extra with "
                                f"{_HINT}") from None
