"""The ``llm`` plugin through the real ``llm`` command line.

llm finds plugins through the ``llm`` entry points of installed distributions; with
``LLM_LOAD_PLUGINS`` it loads only the distributions named there. The tests give the
subprocess a distribution record of this package whose entry points are read from
pyproject.toml, ahead of the installed one on its path, so they test this checkout's
declaration without installing anything; ``LLM_USER_PATH`` keeps llm's logs in a
temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import args_local
from conftest import cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about your weekend."


@pytest.fixture
def llm_env(tmp_path, model_home) -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["llm"]
    dist = tmp_path / "dist" / f"args_local-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (dist / "entry_points.txt").write_text("[llm]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    path = os.pathsep.join(filter(None, [str(dist.parent), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "LLM_LOAD_PLUGINS": project["name"], "LLM_USER_PATH": str(tmp_path / "llm")}


def llm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The real ``llm`` command line."""
    return subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True, env=env, timeout=300)


def test_models_lists_the_default_and_the_models_found(llm_env):
    run = llm(llm_env, "models")
    assert run.returncode == 0, run.stderr
    ours = [line for line in run.stdout.splitlines() if line.startswith("ArgsLocal: ")]
    assert "ArgsLocal: args-local" in ours
    assert "ArgsLocal: args-local/smollm2:latest (aliases: args-local/smollm2)" in ours
    assert "ArgsLocal: args-local/bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1" in ours


def test_a_prompt_gets_the_clis_text(llm_env):
    run = llm(llm_env, "-m", "args-local", PROMPT, "-o", "mode", "greedy", "-o", "weight", "0", "-o", "max_tokens", "16")
    assert run.returncode == 0, run.stderr
    expected = cli("generate", "-w", "0", "--mode", "greedy", "-n", "16", PROMPT)
    assert expected.returncode == 0 and expected.stdout.strip()
    assert run.stdout == expected.stdout.decode()
    by_alias = llm(llm_env, "-m", "args-local/smollm2", PROMPT, "-o", "mode", "greedy", "-o", "weight", "0", "-o", "max_tokens", "16")
    assert by_alias.stdout == run.stdout


def test_a_conversation_carries_its_history(llm_env):
    """``llm -c`` continues the logged conversation: the reply is the API's chat reply to the
    whole history, with llm's system message first."""
    options = ("-o", "weight", "0", "-o", "max_tokens", "16", "-o", "mode", "greedy")  # the defaults sample
    first = llm(llm_env, "-m", "args-local", "My name is Zanzibar.", "-s", "Be brief.", *options)
    second = llm(llm_env, "-c", "What is my name?", *options)
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Zanzibar."},
        {"role": "assistant", "content": first.stdout.removesuffix("\n")},
        {"role": "user", "content": "What is my name?"},
    ]
    model = args_local.load()
    assert second.stdout == model.chat(history, weight=0, max_tokens=16, mode="greedy").text + "\n"
    assert second.stdout != model.chat(history[-1:], weight=0, max_tokens=16, mode="greedy").text + "\n"


@pytest.mark.parametrize("option, words", [
    (("top_k", "0"), "top-k must be an integer of at least 1, not 0"),
    (("mode", "fast"), "mode must be one of greedy, sample"),
    (("weight", "heavy"), "valid number"),
    (("top_kk", "3"), "Extra inputs are not permitted"),
])
def test_options_are_checked_by_the_settings_rules(llm_env, option, words):
    run = llm(llm_env, "-m", "args-local", "hi", "-o", *option)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert words in run.stderr


def test_the_policy_url_variable_puts_the_policy_on_that_server(llm_env, policy_path, tmp_path):
    """``$ARGS_LOCAL_POLICY_URL`` is the plugin's --policy-url: greedy gives the server's own text."""
    from test_remote import free_port, server_text, start_server, stop

    greedy = ("-o", "mode", "greedy", "-o", "weight", "0", "-o", "repeat_penalty", "1", "-o", "max_tokens", "16")
    url, proc = start_server(policy_path, tmp_path / "llama-server.log", "-fa", "off")
    try:
        run = llm({**llm_env, "ARGS_LOCAL_POLICY_URL": url}, "-m", "args-local", PROMPT, *greedy)
        assert run.returncode == 0, run.stderr
        assert run.stdout == server_text(url, PROMPT, 16) + "\n"
    finally:
        stop(proc)
    down = llm({**llm_env, "ARGS_LOCAL_POLICY_URL": f"http://127.0.0.1:{free_port()}"}, "-m", "args-local", PROMPT, *greedy)
    assert down.returncode == 1 and "cannot reach the policy server" in down.stderr and "Traceback" not in down.stderr
