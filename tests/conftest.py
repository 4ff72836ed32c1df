"""Shared fixtures: the real default models, and real reward models built from PyPI packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from args_local.runtime.models import default_policy, default_reward

# Models built on first use (-r nontoxic) go to a cache of this test session, for the CLI's
# subprocesses too, not to the user's.
os.environ["ARGS_LOCAL_CACHE"] = tempfile.mkdtemp(prefix="args-local-test-cache-")


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
def hatesonar_reward() -> Path:
    """The shipped non-toxicity reward (``-r nontoxic``), built from the PyPI package hatesonar
    into this session's cache: reward = P(neither hate speech nor offensive), raw strings in."""
    pytest.importorskip("onnx")
    from args_local.runtime.models import nontoxic_reward

    return nontoxic_reward()


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


OLLAMA_DIGEST = "5e" * 32


def ollama_manifest(model_digest: str) -> dict:
    """A manifest as ollama writes it: a config, a template layer and the model layer."""
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "c0" * 32, "size": 400},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "7e" * 32, "size": 1200},
            {"mediaType": "application/vnd.ollama.image.model", "digest": model_digest, "size": 98000000},
        ],
    }


@pytest.fixture
def model_home(tmp_path, monkeypatch, policy_path) -> Path:
    """A HOME where the default GGUF sits, as links, in ollama's store (``smollm2:latest``,
    ``smollm2:135m``), LM Studio's folder and the Hugging Face hub cache; the environment
    points there (also for the subprocesses tests start)."""
    home = tmp_path / "home"
    ollama = home / ".ollama" / "models"
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / f"sha256-{OLLAMA_DIGEST}").symlink_to(policy_path)
    for tag in ("latest", "135m"):
        manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(ollama_manifest(f"sha256:{OLLAMA_DIGEST}")))
    lm_studio = home / ".lmstudio" / "models" / "bartowski" / "SmolLM2-135M-Instruct-GGUF"
    lm_studio.mkdir(parents=True)
    (lm_studio / "SmolLM2-135M-Instruct-Q4_1.gguf").symlink_to(policy_path)
    repo = home / ".cache" / "huggingface" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    revision = "0a" * 20
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / ("b1" * 32)).symlink_to(policy_path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "smollm2-135m-instruct-q4_1.gguf").symlink_to(Path("../..") / "blobs" / ("b1" * 32))
    monkeypatch.setenv("HOME", str(home))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "ARGS_LOCAL_MODEL", "ARGS_LOCAL_REWARD_MODEL", "ARGS_LOCAL_THREADS"):
        monkeypatch.delenv(var, raising=False)
    return home
