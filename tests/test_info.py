"""`args-local info` on the real default GGUF policy, on GGUF files written by the gguf
package, and on reward-model folders built here; runs without the export extra."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from args_local.core.errors import ModelError
from args_local.info import _io_lines, describe, read_gguf
from conftest import cli


def as_dict(lines: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in lines:
        out.setdefault(key, []).append(value)
    return out


# -- GGUF -----------------------------------------------------------------------------


@pytest.mark.slow
def test_default_policy_gguf_agrees_with_llama_cpp(policy_path):
    import llama_cpp

    info = as_dict(describe(policy_path))
    llm = llama_cpp.Llama(str(policy_path), vocab_only=True, verbose=False)
    meta = llm.metadata
    try:
        assert info["architecture"] == [meta["general.architecture"]] == ["llama"]
        assert info["layers"] == [meta["llama.block_count"]]
        assert info["context length"] == [meta["llama.context_length"]]
        assert info["vocab size"] == [str(llm.n_vocab())] == ["49152"]
        assert info["tokenizer"][0].startswith(meta["tokenizer.ggml.model"])
        assert info["chat template"] == [f"present ({len(meta['tokenizer.chat_template'])} characters)"]
        assert info["quantization"][0].startswith("Q4_1")
        assert "bos '<|im_start|>' (1)" in info["special tokens"][0]
        assert info["size"][0].endswith(f"({policy_path.stat().st_size} bytes)")
        assert info["parameters"][0].startswith("134.")
    finally:
        llm.close()


def test_gguf_written_by_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test")
    w.add_block_count(3)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_file_type(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁hi", "é"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_float32("test.pi", 3.25)
    w.add_bool("test.flag", True)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("token_embd.weight", np.zeros((5, 8), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    version, meta, tensors = read_gguf(path)
    assert version == 3 and meta["test.pi"] == 3.25 and meta["test.flag"] is True
    assert meta["tokenizer.ggml.tokens"] == ["<unk>", "<s>", "</s>", "▁hi", "é"]
    assert len(meta["tokenizer.ggml.scores"]) == 5 and len(meta["test.nested"]) == 2
    assert sorted(name for name, _, _ in tensors) == ["output_norm.weight", "token_embd.weight"]
    info = as_dict(describe(path))
    assert info["name"] == ["tiny test"] and info["layers"] == ["3"] and info["context length"] == ["256"]
    assert info["vocab size"] == ["5"] and info["tokenizer"] == ["llama"]
    assert info["chat template"] == ["absent (use --raw prompts)"]
    assert info["parameters"] == ["48 in 2 tensors"]
    assert info["quantization"][0].startswith("F16") and "1 F16" in info["quantization"][0]
    assert info["special tokens"] == ["bos '<s>' (1), eos '</s>' (2)"] and info["adds BOS"] == ["yes"]


@pytest.mark.slow
def test_truncated_and_foreign_files_are_clear_errors(policy_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(policy_path.read_bytes()[:200_000])
    with pytest.raises(ModelError, match="truncated GGUF"):
        describe(cut)
    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ModelError, match="GGUF version 1 is not supported"):
        describe(old)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="neither a GGUF file nor an ONNX model"):
        describe(text)
    with pytest.raises(ModelError, match="does not exist"):
        describe(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match="folder without model.onnx"):
        describe(tmp_path)


# -- reward models ------------------------------------------------------------------------


@pytest.fixture
def token_reward(tmp_path) -> Path:
    """A real token-id ONNX model: mean of embeddings, then a linear reward; a WordLevel tokenizer."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "good", "bad", "day", "a", "was", "it"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "reward",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(rng.normal(size=(len(words), 4)).astype(np.float32), "emb"),
         numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="test-builder")
    model.ir_version = 8
    folder = tmp_path / "tiny-reward"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    tok.save(str(folder / "tokenizer.json"))
    manifest = {"name": "tiny", "input": "token_ids", "format": "response", "output": "logits", "index": 0,
                "activation": "sigmoid", "weight": 2.0, "labels": ["good"], "source": "built in a test"}
    (folder / "reward.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
def test_reward_folder(token_reward):
    info = as_dict(describe(token_reward))
    assert info["format"] == ["ONNX reward model folder"]
    assert info["manifest"] == [str(token_reward / "reward.json")]
    assert info["name"] == ["tiny"] and info["input"][0] == "token_ids, format response"
    assert info["kv cache"] == ["no"] and info["pad token id"] == ["0"]
    assert info["reward"] == ["output logits, index 0, activation sigmoid, range [0, 1]"]
    assert info["suggested weight"] == ["2"] and info["labels"] == ["good"]
    assert info["exported from"] == ["built in a test"]
    assert info["input"][1:] == ["input_ids int64 [batch, sequence]", "attention_mask int64 [batch, sequence]"]
    assert info["output"] == ["logits float32 [batch, 1]"]
    assert info["tokenizer"] == ["WordLevel, 8 tokens"] and info["producer"] == ["test-builder"]
    assert info["check"][0].startswith("ok")
    # a bare .onnx file next to its manifest reads the same manifest
    assert as_dict(describe(token_reward / "model.onnx"))["name"] == ["tiny"]


@pytest.mark.slow
def test_reward_folder_that_would_fail_to_load_says_why(token_reward):
    manifest = json.loads((token_reward / "reward.json").read_text())
    (token_reward / "reward.json").write_text(json.dumps({**manifest, "index": 3}))
    info = as_dict(describe(token_reward))
    assert info["check"][0].startswith("FAILS:") and "index 3 is out of range" in info["check"][0]
    assert info["output"] == ["logits float32 [batch, 1]"]  # still described
    (token_reward / "reward.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        describe(token_reward)


@pytest.mark.slow
def test_reward_folder_without_manifest_and_string_input(hatesonar_reward, tmp_path):
    info = as_dict(describe(hatesonar_reward))
    assert info["input"][0] == "text, format response" and info["check"][0].startswith("ok")
    assert any("string" in line for line in info["input"][1:])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((hatesonar_reward / "model.onnx").read_bytes())
    assert as_dict(describe(bare))["manifest"][0].startswith("none")


def test_cache_tensors_collapse_to_one_line_each():
    Value = namedtuple("Value", "name type shape")
    values = [Value("input_ids", "tensor(int64)", ["b", "s"])] + [
        Value(f"past_key_values.{i}.{kv}", "tensor(float)", ["b", 2, "past", 8]) for i in range(3) for kv in ("key", "value")
    ]
    assert _io_lines(values) == [
        "input_ids int64 [b, s]",
        "past_key_values.{0..2}.key float32 [b, 2, past, 8] (3 layers)",
        "past_key_values.{0..2}.value float32 [b, 2, past, 8] (3 layers)",
    ]


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_info(policy_path, token_reward, tmp_path):
    run = cli("info", str(policy_path))
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout.decode()
    assert "architecture: llama\n" in out and "vocab size: 49152\n" in out and "chat template: present" in out
    run = cli("info", str(token_reward))
    assert run.returncode == 0 and "check: ok" in run.stdout.decode()
    run = cli("info", str(tmp_path / "nothing.gguf"))
    err = run.stderr.decode()
    assert run.returncode == 1 and err.startswith("args-local: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
