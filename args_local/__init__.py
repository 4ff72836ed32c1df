"""args-local: ARGS (Alignment as Reward-Guided Search) decoding on local models.

The public API (see :mod:`args_local.api`)::

    import args_local
    model = args_local.load()
    print(model.generate("Tell me about your weekend.", max_tokens=64).text)

Importing the package is cheap: numpy, llama.cpp and onnxruntime load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it, imported when the name is first used
_PUBLIC = {
    "load": ".api",
    "Model": ".api",
    "Stream": ".api",
    "Result": ".core.request",
    "Settings": ".core.settings",
    "ArgsLocalError": ".core.errors",
    "SettingsError": ".core.errors",
    "ModelError": ".core.errors",
    "PromptError": ".core.errors",
}
__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:
    from .api import Model, Stream, load
    from .core.errors import ArgsLocalError, ModelError, PromptError, SettingsError
    from .core.request import Result
    from .core.settings import Settings


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'args_local' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
