"""A stand-in for a GGUF policy where the real file cannot travel: same metadata, same tensors,
random weights.

The device machine that scripts/gpu_check.sh runs on reaches no package index, and what a call
may carry (64 MiB, the repository included) leaves no room for the default policy's 98 MB file.
``skeleton`` keeps everything of a GGUF file but its tensor data (vocabulary, merges, chat template,
hyper-parameters, and each tensor's name, shape and type), a few MB; ``fill`` writes a full GGUF
from it with seeded normal weights (norm weights 1), quantized to each tensor's original type.
The twin has the real model's architecture, size, quantization and tokenizer, so it costs the same
per token on llama.cpp and shares the default reward model's vocabulary; its text is noise. Its
logits are flat (random weights), which makes near ties common: see tests/test_gpu.py.

    python scripts/gguf_twin.py skeleton SRC.gguf OUT.skeleton.gguf
    python scripts/gguf_twin.py fill OUT.skeleton.gguf TWIN.gguf [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np

TENSORS_KEY = "twin.tensors"  # JSON: [[name, shape (ggml order), GGMLQuantizationType value], ...]
INIT_STD = 0.02  # the usual initialisation scale of Llama-family weights
# Fields the reader shows that the writer makes itself.
WRITER_OWNED = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", TENSORS_KEY}


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key/value of ``reader`` (tokenizer, template, hyper-parameters) into ``writer``."""
    for field in reader.fields.values():
        if field.name in WRITER_OWNED:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def skeleton(src: Path, out: Path) -> None:
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    specs = [[t.name, [int(n) for n in t.shape], int(t.tensor_type)] for t in reader.tensors]
    writer = gguf.GGUFWriter(str(out), arch)
    copy_fields(reader, writer)
    writer.add_string(TENSORS_KEY, json.dumps(specs))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def fill(skeleton_path: Path, out: Path, seed: int) -> None:
    reader = gguf.GGUFReader(str(skeleton_path))
    if TENSORS_KEY not in reader.fields:
        sys.exit(f"{skeleton_path} is not a skeleton made by this script (no {TENSORS_KEY})")
    arch = reader.fields["general.architecture"].contents()
    specs = json.loads(reader.fields[TENSORS_KEY].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    copy_fields(reader, writer)
    rng = np.random.default_rng(seed)
    for name, shape, qtype_value in specs:
        qtype = gguf.GGMLQuantizationType(qtype_value)
        rows = shape[::-1]  # ggml lists the fastest-moving dimension first; numpy last
        if name.endswith("norm.weight"):
            data = np.ones(rows, dtype=np.float32)
        else:
            data = rng.normal(0.0, INIT_STD, size=rows).astype(np.float32)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, data.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("skeleton", help="metadata and tensor list of a GGUF file, no weights")
    s.add_argument("src", type=Path)
    s.add_argument("out", type=Path)
    f = sub.add_parser("fill", help="a full GGUF with seeded random weights from a skeleton")
    f.add_argument("skeleton", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "skeleton":
        skeleton(args.src, args.out)
    else:
        fill(args.skeleton, args.out, args.seed)


if __name__ == "__main__":
    main()
