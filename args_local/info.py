"""``args-local info``: what a GGUF policy or a reward-model folder is.

GGUF files are described from their header, read here (no llama.cpp context, no
tensor data): architecture, layers, context length, vocabulary, tokenizer, chat
template, parameters and quantization. Reward models (a folder or a bare ``.onnx``)
are described from their manifest, their ONNX inputs and outputs and their
tokenizer, and loaded the way ``generate -r`` loads them, so a model that would fail
there says why here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .core.errors import ModelError
from .core.gguf import GGUF_MAGIC, SkippedArray, read_gguf

# llama.cpp's llama_ftype (general.file_type), the common ones.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# ggml tensor types, for the per-tensor summary.
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

ONNX_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(string)": "string", "tensor(bool)": "bool",
}

WHAT_INFO_TAKES = (
    "info describes a GGUF policy file, a reward-model folder (model.onnx, tokenizer.json, reward.json) "
    "or an .onnx file"
)


def describe(path: Path) -> list[tuple[str, str]]:
    """(key, value) lines describing a GGUF file, a reward-model folder or an .onnx file."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist ({WHAT_INFO_TAKES})")
    if path.is_dir():
        if not (path / "model.onnx").exists():
            raise ModelError(f"{path} is a folder without model.onnx; {WHAT_INFO_TAKES}")
        return describe_reward(path)
    if not path.is_file():  # a FIFO or a device: reading it could block forever
        raise ModelError(f"{path} is not a regular file; {WHAT_INFO_TAKES}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return describe_gguf(path)
    if path.suffix.lower() == ".onnx":
        return describe_reward(path)
    raise ModelError(f"{path} is neither a GGUF file nor an ONNX model; {WHAT_INFO_TAKES}")


# -- GGUF ---------------------------------------------------------------------------


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    version, meta, tensors = read_gguf(path)
    arch = str(meta.get("general.architecture", "unknown"))

    def arch_key(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    tokens = meta.get("tokenizer.ggml.tokens")
    lines: list[tuple[str, str]] = [("file", str(path)), ("format", f"GGUF v{version} (policy model for llama.cpp)")]
    if "general.name" in meta:
        lines.append(("name", str(meta["general.name"])))
    lines.append(("architecture", arch))
    params = sum(math.prod(dims) for _, dims, _ in tensors)
    lines.append(("parameters", f"{_count(params)} in {len(tensors)} tensors"))
    file_type = meta.get("general.file_type")
    counts: dict[str, int] = {}
    for _, dims, ttype in tensors:
        counts[TENSOR_TYPES.get(ttype, str(ttype))] = counts.get(TENSOR_TYPES.get(ttype, str(ttype)), 0) + 1
    mix = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    label = FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "unknown"
    lines.append(("quantization", f"{label} (tensors: {mix})" if mix else label))
    for key, name in (
        ("layers", "block_count"),
        ("context length", "context_length"),
        ("embedding size", "embedding_length"),
        ("attention heads", "attention.head_count"),
        ("key/value heads", "attention.head_count_kv"),
    ):
        value = arch_key(name)
        if value is not None:
            lines.append((key, _plain(value)))
    lines.append(("vocab size", str(len(tokens)) if tokens is not None else "unknown (no tokenizer.ggml.tokens)"))
    tokenizer = str(meta.get("tokenizer.ggml.model", "none"))
    pre = meta.get("tokenizer.ggml.pre")
    lines.append(("tokenizer", f"{tokenizer} (pre-tokenizer {pre})" if pre else tokenizer))
    specials = []
    for name in ("bos", "eos", "eot", "padding", "unknown"):
        tid = meta.get(f"tokenizer.ggml.{name}_token_id")
        if tid is not None:
            text = tokens[tid] if isinstance(tokens, list) and 0 <= tid < len(tokens) else "?"
            specials.append(f"{name} {text!r} ({tid})")
    if specials:
        lines.append(("special tokens", ", ".join(specials)))
    if "tokenizer.ggml.add_bos_token" in meta:
        lines.append(("adds BOS", "yes" if meta["tokenizer.ggml.add_bos_token"] else "no"))
    template = meta.get("tokenizer.chat_template")
    lines.append((
        "chat template",
        f"present ({len(template)} characters)" if isinstance(template, str) and template else "absent (use --raw prompts)",
    ))
    lines.append(("size", _bytes(path.stat().st_size)))
    return lines


# -- reward models ----------------------------------------------------------------------


def describe_reward(path: Path) -> list[tuple[str, str]]:
    from .core.manifest import FILENAME, Manifest, read_manifest
    from .runtime import reward as rw

    onnx_file, folder = rw.resolve_folder(path)
    manifest = read_manifest(folder) or Manifest(name=onnx_file.stem)
    lines: list[tuple[str, str]] = [
        ("path", str(path)),
        ("format", "ONNX reward model" + (" folder" if path.is_dir() else " file")),
    ]
    manifest_file = folder / FILENAME
    lines.append(("manifest", str(manifest_file) if manifest_file.exists() else "none (defaults: the response alone, the first output)"))
    lines.append(("name", manifest.name))
    lines.append(("input", f"{manifest.input}, format {manifest.format}"))
    if manifest.template:
        lines.append(("template", json.dumps(manifest.template, ensure_ascii=False)))
    if manifest.system_template:
        lines.append(("system template", json.dumps(manifest.system_template, ensure_ascii=False)))
    lines.append(("reads", _reads(manifest)))
    caches = {"per-row": "yes, a past per row (scored incrementally)", "shared": "yes, one past shared by all candidates (scored incrementally)"}
    lines.append(("kv cache", caches.get(manifest.kv_cache, "no")))
    if manifest.bos_token_id is not None:
        lines.append(("bos token id", str(manifest.bos_token_id)))
    if manifest.input == "token_ids":
        lines.append(("pad token id", str(manifest.pad_token_id)))
    reward = f"output {manifest.output or '(first)'}, index {manifest.index}, activation {manifest.activation}"
    bounds = manifest.range
    reward += f", range [{bounds[0]:g}, {bounds[1]:g}]" if bounds else ", unbounded"
    lines.append(("reward", reward))
    lines.append(("max length", f"{manifest.max_length} tokens"))
    if manifest.weight is not None:
        lines.append(("suggested weight", f"{manifest.weight:g}"))
    if isinstance(manifest.extra.get("labels"), list):
        lines.append(("labels", ", ".join(str(v) for v in manifest.extra["labels"])))
    for key in ("source", "architecture"):
        if key in manifest.extra:
            lines.append(("exported from" if key == "source" else key, str(manifest.extra[key])))

    check = "ok (loads as generate -r loads it, and scores a test input)"
    try:
        model = rw.RewardModel(path, threads=1)
        session = model.session
    except ModelError as e:
        check = f"FAILS: {e}"
        try:
            session = rw.ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        except Exception as e2:  # onnxruntime's own untyped errors
            lines.append(("check", f"FAILS: onnxruntime cannot load {onnx_file}: {str(e2).strip().splitlines()[0] if str(e2).strip() else type(e2).__name__}"))
            lines.append(("size", _bytes(_size(folder if path.is_dir() else onnx_file))))
            return lines
    for key, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        for text in _io_lines(values):
            lines.append((key[:-1], text))
    meta = session.get_modelmeta()
    if meta.producer_name:
        lines.append(("producer", meta.producer_name))
    if manifest.input == "token_ids" and (folder / "tokenizer.json").is_file():
        lines.append(("tokenizer", _tokenizer_line(folder / "tokenizer.json")))
    lines.append(("check", check))
    lines.append(("size", _bytes(_size(folder) if path.is_dir() else _size(onnx_file))))
    return lines


def _reads(manifest: Any) -> str:
    """What the reward model reads of a conversation, in words (see :mod:`args_local.core.manifest`)."""
    if manifest.format == "pair":
        return "the (prompt, response) pair"
    if manifest.format == "response":
        return "[bos] + the response alone (not the prompt)" if manifest.kv_cache else "the response alone (not the prompt)"
    if manifest.system_template:
        system = "a system message through the system template"
    elif "{system}" in manifest.template:
        system = "a system message at {system}"
    else:
        system = "a system message on its own line before the prompt"
    cached = "; cached: the text before {response} once per request, the text after it ends every candidate" if manifest.kv_cache else ""
    return f"the conversation in the template, {system}{cached}"


def _io_lines(values: list[Any]) -> list[str]:
    """One line per input or output; the per-layer cache tensors collapse into one line each."""
    order: list[str | tuple[str, str, str, str]] = []
    layers: dict[tuple[str, str, str, str], list[int]] = {}
    for v in values:
        parts = v.name.split(".")
        kind = ONNX_TYPES.get(v.type, v.type)
        shape = "[" + ", ".join(str(d) for d in v.shape) + "]" if v.shape is not None else "[?]"
        if len(parts) == 3 and parts[0] in ("past_key_values", "present", "new_key_values") and parts[1].isdigit():
            key = (parts[0], parts[2], kind, shape)
            if key not in layers:
                layers[key] = []
                order.append(key)
            layers[key].append(int(parts[1]))
        else:
            order.append(f"{v.name} {kind} {shape}")
    lines = []
    for item in order:
        if isinstance(item, str):
            lines.append(item)
            continue
        ids = layers[item]
        span = f"{min(ids)}..{max(ids)}" if len(ids) > 1 else str(ids[0])
        lines.append(f"{item[0]}.{{{span}}}.{item[1]} {item[2]} {item[3]} ({len(ids)} layers)")
    return lines


def _tokenizer_line(file: Path) -> str:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
        data = json.loads(file.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        return f"unreadable ({e})"
    kind = (data.get("model") or {}).get("type") or "unknown"
    return f"{kind}, {tok.get_vocab_size(with_added_tokens=True)} tokens"


# -- helpers ------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    if isinstance(value, SkippedArray):
        return f"array of {len(value)}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
