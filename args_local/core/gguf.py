"""GGUF headers, read without llama.cpp: metadata and tensor shapes, bounds-checked.

``info`` describes a policy from them, and the policy runtime sizes the KV cache a ``-c``
would need before llama.cpp allocates it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelError

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types: struct format and size of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class Reader:
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
            return SkippedArray(n)
        raise ValueError(f"unknown GGUF value type {vtype}")


class SkippedArray:
    """An array whose elements were skipped: only its length is kept."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def read_gguf(path: Path, full: bool = True) -> tuple[int, dict[str, Any], list[tuple[str, list[int], int]]]:
    """(version, metadata, tensors as (name, dims, ggml type)); only the vocabulary's
    token strings are kept among the arrays (others keep their length). ``full=False`` is the
    quick look the runtime needs: the metadata up to the tokenizer's (which converters write
    after the architecture's, and which holds the long vocabulary arrays), and no tensors."""
    size = path.stat().st_size
    try:
        with path.open("rb", buffering=1 << 20) as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file")
            version = struct.unpack("<I", f.read(4))[0]
            if version not in (2, 3):
                raise ModelError(f"{path}: GGUF version {version} is not supported (llama.cpp reads 2 and 3)")
            r = Reader(f, size, version)
            n_tensors, n_kv = r.count(), r.count()
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                if not full and key.startswith("tokenizer."):
                    break
                vtype = r.unpack("<I")
                meta[key] = r.value(vtype, keep_array=full and key == "tokenizer.ggml.tokens")
            found = []
            for _ in range(n_tensors if full else 0):
                name = r.string()
                n_dims = r.unpack("<I")
                if n_dims > 8:
                    raise ValueError(f"tensor {name} has {n_dims} dimensions")
                dims = [r.unpack("<Q") for _ in range(n_dims)]
                ttype = r.unpack("<I")
                r.unpack("<Q")  # data offset
                found.append((name, dims, ttype))
    except (EOFError, struct.error):
        raise ModelError(f"{path} is a truncated GGUF file (re-download it)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is a corrupt GGUF file ({e})") from None
    return version, meta, found


def kv_cache_bytes(meta: dict[str, Any], n_ctx: int) -> int | None:
    """Bytes of llama.cpp's default KV cache (f16 keys and values, every layer) for ``n_ctx``
    tokens, from a GGUF's metadata; None when the metadata does not say enough."""
    arch = meta.get("general.architecture")

    def get(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    layers, heads, embedding = get("block_count"), get("attention.head_count"), get("embedding_length")
    kv_heads = get("attention.head_count_kv") or heads
    if not (layers and heads and embedding and kv_heads):
        return None
    key_dim = get("attention.key_length") or embedding // heads
    value_dim = get("attention.value_length") or embedding // heads
    return 2 * layers * n_ctx * kv_heads * (key_dim + value_dim)
