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
import struct
from pathlib import Path
from typing import Any, BinaryIO

from .core.errors import ModelError

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types: struct format and size of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

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
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return describe_gguf(path)
    if path.suffix.lower() == ".onnx":
        return describe_reward(path)
    raise ModelError(f"{path} is neither a GGUF file nor an ONNX model; {WHAT_INFO_TAKES}")


# -- GGUF ---------------------------------------------------------------------------


class _Reader:
    """Little-endian GGUF fields from a buffered file, with bounds checks."""

    def __init__(self, f: BinaryIO, size: int, version: int) -> None:
        self.f = f
        self.size = size
        self.version = version

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self) -> int:
        n = self.unpack("<Q" if self.version >= 2 else "<I")
        if n > self.size:
            raise ValueError(f"a count of {n} in a file of {self.size} bytes")
        return n

    def string(self) -> str:
        return self.take(self.count()).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.count()
        self.f.seek(n, 1)

    def value(self, vtype: int, keep_array: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            n = self.count()
            if keep_array:
                return [self.value(etype, False) for _ in range(n)]
            if etype in _SCALARS:
                self.f.seek(n * struct.calcsize(_SCALARS[etype]), 1)
            elif etype == _STRING:
                for _ in range(n):
                    self.skip_string()
            else:
                for _ in range(n):
                    self.value(etype, False)
            return _Array(n)
        raise ValueError(f"unknown GGUF value type {vtype}")


class _Array:
    """An array whose elements were skipped: only its length is kept."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def read_gguf(path: Path) -> tuple[int, dict[str, Any], list[tuple[str, list[int], int]]]:
    """(version, metadata, tensors as (name, dims, ggml type)); only the vocabulary's
    token strings are kept among the arrays (others keep their length)."""
    size = path.stat().st_size
    try:
        with path.open("rb", buffering=1 << 20) as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file")
            version = struct.unpack("<I", f.read(4))[0]
            if version not in (2, 3):
                raise ModelError(f"{path}: GGUF version {version} is not supported (llama.cpp reads 2 and 3)")
            r = _Reader(f, size, version)
            n_tensors, n_kv = r.count(), r.count()
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                vtype = r.unpack("<I")
                meta[key] = r.value(vtype, keep_array=key == "tokenizer.ggml.tokens")
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                if n_dims > 8:
                    raise ValueError(f"tensor {name} has {n_dims} dimensions")
                dims = [r.unpack("<Q") for _ in range(n_dims)]
                ttype = r.unpack("<I")
                r.unpack("<Q")  # data offset
                tensors.append((name, dims, ttype))
    except (EOFError, struct.error):
        raise ModelError(f"{path} is a truncated GGUF file (re-download it)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is a corrupt GGUF file ({e})") from None
    return version, meta, tensors


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
    if manifest.input == "token_ids" and (folder / "tokenizer.json").exists():
        lines.append(("tokenizer", _tokenizer_line(folder / "tokenizer.json")))
    lines.append(("check", check))
    lines.append(("size", _bytes(_size(folder) if path.is_dir() else _size(onnx_file))))
    return lines


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
    if isinstance(value, _Array):
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
