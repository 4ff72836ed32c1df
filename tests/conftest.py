"""Shared fixtures: the real default models, and real reward models built from PyPI packages."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from args_local.runtime.models import default_policy, default_reward


@pytest.fixture(scope="session")
def policy_path() -> Path:
    return default_policy()


@pytest.fixture(scope="session")
def reward_path() -> Path:
    return default_reward()


@pytest.fixture(scope="session")
def policy(policy_path):
    from args_local.runtime.policy import LlamaPolicy

    return LlamaPolicy(policy_path, n_ctx=2048)


@pytest.fixture(scope="session")
def reward(reward_path):
    from args_local.runtime.reward import RewardModel

    return RewardModel(reward_path)


@pytest.fixture(scope="session")
def hatesonar_reward(tmp_path_factory) -> Path:
    """The string-input ONNX classifier from the PyPI package hatesonar as a reward-model folder:
    reward = P(neither hate nor offensive). Its lowercasing node asks for a locale these
    machines lack, so the folder's copy names C.UTF-8."""
    onnx = pytest.importorskip("onnx")
    source = importlib.metadata.distribution("hatesonar").locate_file("hatesonar/model/model.onnx")
    model = onnx.load(str(source))
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
    folder = tmp_path_factory.mktemp("hatesonar")
    onnx.save(model, str(folder / "model.onnx"))
    manifest = {"name": "hatesonar-clean", "input": "text", "format": "response", "output": "output_probability", "index": 2, "range": [0, 1]}
    (folder / "reward.json").write_text(json.dumps(manifest))
    return folder


def cli(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "args_local", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=env,
    )
