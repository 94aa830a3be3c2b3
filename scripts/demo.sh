#!/usr/bin/env bash
# Set up a virtual environment and run the local demo: EfficientNet-Lite0 served by oclaw, real photos classified.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[speed,demo,lambda,optimize]'
exec .venv/bin/python examples/demo.py "$@"
