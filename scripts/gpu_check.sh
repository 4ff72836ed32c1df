#!/usr/bin/env bash
# Prove args-local's GPU path in one run and write a Markdown report; see scripts/gpu_check.py
# (--help) and README's "CUDA and Metal". Without a GPU it checks what it can and exits 0.
#   scripts/gpu_check.sh [--report gpu-report.md] [--wheelhouse DIR --no-index] [--workdir DIR]
# PYTHON picks the interpreter (default python3): the project's environment for the checks
# without a GPU; any Python 3.11+ with CUDA's compiler at hand for the GPU run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
