"""Loading the models a front end asks for: the embedded defaults unless told otherwise."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import SettingsError
from .engine import Engine, Guide

MIN_CTX = 16


def max_threads() -> int:
    """More threads than 4 per core only make llama.cpp and onnxruntime wait on each other."""
    return 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class RewardSpec:
    """One ``-r PATH[:WEIGHT]``: a reward model (a folder, an .onnx file or a shipped name)
    and its weight (None: the request's -w, else the model's suggestion)."""

    path: Path
    weight: float | None = None

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """``PATH`` or ``PATH:WEIGHT``; a path that exists as written is never split, so a
        file whose name ends in a colon and a number still loads."""
        head, sep, tail = text.rpartition(":")
        if not sep or not head or Path(text).exists():
            return cls(Path(text))
        try:
            weight = float(tail)
        except ValueError:
            return cls(Path(text))
        if not math.isfinite(weight):
            raise SettingsError(f"the weight in -r {text} must be a finite number")
        return cls(Path(head), weight)

    def __str__(self) -> str:
        return str(self.path) if self.weight is None else f"{self.path}:{self.weight:g}"


@dataclass(frozen=True)
class ModelOptions:
    """Which models to load and how to run them (what a request cannot change). ``model`` is a
    GGUF path or a name that :func:`~args_local.runtime.models.resolve_policy` finds;
    ``reward_model`` is one reward model (the Python API's), ``rewards`` the CLI's repeated -r."""

    model: str | Path | None = None
    reward_model: Path | None = None
    rewards: tuple[RewardSpec, ...] = ()
    ctx_size: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    verbose: bool = False
    # The policy on a server instead of in this process (``model`` then only names its GGUF,
    # read for the tokenizer and chat template; without it the server's own are used).
    policy_url: str | None = None
    policy_api: str = "auto"
    policy_api_key: str | None = None
    policy_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.ctx_size < MIN_CTX:
            raise SettingsError(f"ctx_size must be at least {MIN_CTX}, not {self.ctx_size}")
        if self.threads is not None and not 1 <= self.threads <= max_threads():
            raise SettingsError(f"threads must be from 1 to {max_threads()} (4 per CPU core here), not {self.threads}")
        if self.gpu_layers < -1:
            raise SettingsError(f"gpu_layers must be -1 (all) or at least 0, not {self.gpu_layers}")
        if self.reward_model is not None and self.rewards:
            raise SettingsError("give the reward model either as reward_model or as rewards, not both")
        if self.policy_url is not None:
            from .remote import check_api, check_url

            check_url(self.policy_url)
            check_api(self.policy_api)
            if not self.policy_timeout > 0:
                raise SettingsError(f"policy_timeout must be more than 0 seconds, not {self.policy_timeout}", "policy_timeout")

    def reward_specs(self) -> tuple[RewardSpec, ...]:
        """The reward models to load: those asked for, else the shipped default."""
        from .models import default_reward

        if self.rewards:
            return self.rewards
        return (RewardSpec(self.reward_model or default_reward()),)


def set_log_levels(verbose: bool) -> None:
    """Our log at INFO with -v, else warnings only; urllib3 logs each retry of a policy server,
    and the final failure is our one sentence, so its warnings show only with -v."""
    logging.getLogger("args_local").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING if verbose else logging.ERROR)


def load_policy(options: ModelOptions, vocab=None):
    """The policy named by ``options``: a GGUF run here, or a server's (``policy_url``), whose
    tokenizer is ``vocab``, else that of the GGUF ``model`` names, else the server's own."""
    from . import policy as policy_mod
    from .models import resolve_policy

    if options.policy_url:
        from .remote import RemotePolicy

        if vocab is None and options.model is not None:
            vocab = policy_mod.LlamaVocab.open(resolve_policy(options.model))
        return RemotePolicy(options.policy_url, options.policy_api, options.policy_api_key, vocab,
                            options.policy_timeout, options.ctx_size)
    return policy_mod.LlamaPolicy(
        resolve_policy(options.model),
        n_ctx=options.ctx_size,
        n_threads=options.threads,
        n_gpu_layers=options.gpu_layers,
    )


def load_engine(options: ModelOptions, with_reward: bool = True) -> Engine:
    """The policy and reward model named by ``options`` (the embedded defaults otherwise),
    with llama.cpp's and onnxruntime's logs kept off the terminal unless ``verbose``."""
    from . import policy as policy_mod
    from .models import resolve_reward
    from .reward import RewardModel, quiet_onnxruntime

    policy_mod.set_verbose(options.verbose)
    quiet_onnxruntime(not options.verbose)
    set_log_levels(options.verbose)
    policy = load_policy(options)
    guides = []
    if with_reward:
        guides = [Guide(RewardModel(resolve_reward(spec.path), threads=options.threads, gpu=options.gpu_layers != 0), spec.weight)
                  for spec in options.reward_specs()]
    return Engine(policy, guides=guides)
