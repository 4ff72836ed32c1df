"""Every kind of bad input, through the real CLI: one clear sentence, the right exit code,
no traceback."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli

pytestmark = pytest.mark.slow  # real models or the real CLI


def check(run, code: int, *words: str) -> str:
    err = run.stderr.decode()
    assert run.returncode == code, (run.returncode, err)
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


def gguf_with_architecture(path, arch: str) -> None:
    """A well-formed GGUF header naming an architecture llama.cpp does not know."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("general.architecture") + struct.pack("<I", 8) + string(arch))


# -- the policy file --------------------------------------------------------------

def test_missing_policy(tmp_path):
    check(cli("generate", "hi", "-m", str(tmp_path / "none.gguf")), 1, "policy model not found", "-m")


def test_empty_policy(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    check(cli("generate", "hi", "-m", str(tmp_path / "e.gguf")), 1, "policy model is empty")


def test_non_gguf_policy(tmp_path):
    (tmp_path / "x.gguf").write_text("not a model")
    check(cli("generate", "hi", "-m", str(tmp_path / "x.gguf")), 1, "not a GGUF file")


def test_truncated_policy(tmp_path, policy_path):
    with policy_path.open("rb") as f:
        (tmp_path / "t.gguf").write_bytes(f.read(3_000_000))
    check(cli("generate", "hi", "-m", str(tmp_path / "t.gguf")), 1, "could not load", "corrupted or incomplete")


def test_gguf_llama_cpp_cannot_load(tmp_path):
    gguf_with_architecture(tmp_path / "a.gguf", "future-arch")
    check(cli("generate", "hi", "-m", str(tmp_path / "a.gguf")), 1, "unknown model architecture", "future-arch")


# -- the reward model ---------------------------------------------------------------

def test_missing_reward_model(tmp_path):
    check(cli("generate", "hi", "-r", str(tmp_path / "nothing")), 1, "reward model not found", "-r")


def test_reward_folder_without_model(tmp_path):
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "has no model.onnx")


def test_empty_reward_model(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "is empty")


def test_corrupt_reward_model(tmp_path):
    (tmp_path / "model.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "onnxruntime could not load")


def minilm_tokenizer():
    """A real tokenizer of another model: all-MiniLM-L6-v2's WordPiece, shipped for eval."""
    from args_local.runtime.models import models_dir

    return models_dir() / "all-minilm-l6-v2" / "tokenizer.json"


def test_reward_inputs_that_do_not_fit_the_manifest(tmp_path, hatesonar_reward):
    shutil.copy(hatesonar_reward / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(minilm_tokenizer(), tmp_path / "tokenizer.json")
    (tmp_path / "reward.json").write_text(json.dumps({"input": "token_ids"}))
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "inputs text tensor(string) do not fit")


def test_invalid_tokenizer_file(tmp_path, hatesonar_reward):
    shutil.copy(hatesonar_reward / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "tokenizer.json").write_bytes(b"{}")
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "not a valid tokenizer.json")


def test_reward_output_not_in_the_model(tmp_path, hatesonar_reward):
    shutil.copy(hatesonar_reward / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "reward.json").write_text(json.dumps({"input": "text", "output": "score"}))
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "'score' is not among its outputs", "output_probability")


def test_reward_index_out_of_range(tmp_path, hatesonar_reward):
    shutil.copy(hatesonar_reward / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "reward.json").write_text(json.dumps({"input": "text", "output": "output_probability", "index": 7}))
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "index 7 is out of range")


def test_manifest_that_is_not_json(tmp_path, hatesonar_reward):
    shutil.copy(hatesonar_reward / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "reward.json").write_text("{input: text")
    check(cli("generate", "hi", "-r", str(tmp_path)), 1, "reward.json is not valid JSON")


def test_tokenizer_that_does_not_match(tmp_path, reward_path):
    shutil.copytree(reward_path, tmp_path / "rm")
    shutil.copy(minilm_tokenizer(), tmp_path / "rm" / "tokenizer.json")
    check(cli("generate", "hi", "-r", str(tmp_path / "rm")), 1, "not the tokenizer this reward model was exported with")


@pytest.mark.parametrize("kv_cache, words", [
    ("maybe", '"kv_cache" must be false, true'),
    (True, "do not fit"),  # the bundled model's shared-cache inputs, declared as per-row
])
def test_kv_cache_that_does_not_fit_the_model(tmp_path, reward_path, kv_cache, words):
    shutil.copytree(reward_path, tmp_path / "rm")
    manifest = json.loads((tmp_path / "rm" / "reward.json").read_text())
    (tmp_path / "rm" / "reward.json").write_text(json.dumps({**manifest, "kv_cache": kv_cache}))
    check(cli("generate", "hi", "-r", str(tmp_path / "rm")), 1, words)


def nan_reward_model(folder, reward_path, nan_share: float) -> None:
    """A real token-id ONNX model whose reward is a lookup of the last token's id, NaN or
    infinite for a share of the vocabulary."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    vocab = 49152
    rng = np.random.default_rng(0)
    table = rng.random((vocab, 1)).astype(np.float32)
    holes = rng.random(vocab) < nan_share
    table[holes] = np.where(rng.random(int(holes.sum())) < 0.5, np.nan, np.inf)[:, None]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    shutil.copy(reward_path / "tokenizer.json", folder / "tokenizer.json")
    (folder / "reward.json").write_text(json.dumps({"input": "token_ids", "format": "response", "output": "logits"}))


def test_nan_rewards_drop_those_candidates(tmp_path, reward_path):
    nan_reward_model(tmp_path / "rm", reward_path, 0.3)
    run = cli("generate", "Tell me about cats.", "-r", str(tmp_path / "rm"), "-n", "12", "--json", "-w", "1")
    check(run, 0)
    assert json.loads(run.stdout)["tokens"] > 0


def test_all_nan_rewards_stop_with_an_error(tmp_path, reward_path):
    nan_reward_model(tmp_path / "rm", reward_path, 1.0)
    run = cli("generate", "Tell me about cats.", "-r", str(tmp_path / "rm"), "-n", "12")
    check(run, 1, "NaN or infinity for every candidate")


# -- flags ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flags, words",
    [
        (["-k", "0"], ["--top-k"]),
        (["-k", "-3"], ["--top-k"]),
        (["-k", "100000"], ["more than the vocabulary"]),
        (["-w", "nan"], ["finite"]),
        (["-w", "inf"], ["finite"]),
        (["-w", "-inf"], ["finite"]),
        (["-n", "0"], ["--max-tokens"]),
        (["-n", "-5"], ["--max-tokens"]),
        (["--mode", "beam"], ["--mode"]),
        (["--temp", "-0.5"], ["--temp"]),
        (["--mode", "greedy", "--temp", "0.8"], ["--temp", "means sample decoding but the mode given is greedy"]),
        (["--mode", "sample", "--temp", "0"], ["--temp", "means greedy decoding"]),
        (["--repeat-penalty", "0"], ["--repeat-penalty"]),
        (["--presence-penalty", "3"], ["--presence-penalty"]),
        (["--min-p", "1.5"], ["--min-p"]),
        (["--top-p", "0"], ["--top-p"]),
        (["-c", "abc"], ["--ctx-size"]),
        (["--resume"], ["--batch"]),
    ],
)
def test_invalid_flags_are_usage_errors(flags, words):
    check(cli("generate", "hi", *flags), 2, *words)


# -- prompts ---------------------------------------------------------------------------

def test_prompt_longer_than_the_context():
    err = check(cli("generate", "word " * 600, "-c", "256"), 1, "context window is 256", "pass -c")
    assert "tokens" in err


@pytest.mark.parametrize("ctx", [16, 40, 255, 300])
def test_a_reply_that_fills_the_context_stops_cleanly(ctx):
    """llama.cpp rounds -c up (to a multiple of 256 here) but llama-cpp-python keeps the size
    asked for: the reply runs to the window asked for and stops there with stop_reason
    "context", exit 0, however small."""
    run = cli("generate", "Once upon a time", "--raw", "-c", str(ctx), "-n", "2000", "--ignore-eos",
              "-w", "0", "--json", timeout=600)
    check(run, 0)
    out = json.loads(run.stdout)
    assert out["stop_reason"] == "context"
    assert out["prompt_tokens"] + out["tokens"] == ctx


@pytest.mark.parametrize("ctx", [16, 255])
def test_a_prompt_over_a_small_context_is_one_sentence(ctx):
    """A prompt longer than a context llama.cpp rounded up (between -c and its allocation)."""
    err = check(cli("generate", "word " * 300, "-c", str(ctx)), 1, f"context window is {ctx}", "pass -c")
    assert "internal error" not in err


def test_non_utf8_stdin():
    check(cli("generate", stdin=b"caf\xe9 \xff\xfe"), 1, "not UTF-8")


@pytest.mark.parametrize("stdin", [b"", b"   \n\t "])
def test_empty_prompt(stdin):
    check(cli("generate", stdin=stdin), 1, "prompt is empty")


def test_ctrl_c_stops_with_130_and_keeps_what_was_shown():
    proc = subprocess.Popen([sys.executable, "-m", "args_local", "generate", "Write a long story.", "-n", "2000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(20)  # text is streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
