#!/usr/bin/env bash
# The GPU acceptance run on a bare CUDA box (docs/benchmarks.md, "Acceptance run on a bare GPU
# box"): runs this checkout's src/ without installing dpzo. Needs python with torch (CUDA),
# transformers, accelerate, peft and triton; not snakemake, datasets or the DP accountants.
# Arguments go to `python -m dpzo.bench.acceptance` (default --out acceptance.json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m dpzo.bench.acceptance "$@"
