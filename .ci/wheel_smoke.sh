#!/usr/bin/env bash
# Build torchbayes' wheel, install it into a fresh venv and run .ci/wheel_smoke.py there.
# The venv sees the system's packages (torch is not downloaded again) but the wheel is
# installed into the venv itself, which comes first on sys.path; the smoke test checks
# that the imported torchbayes is the wheel's.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel --no-deps --no-build-isolation -q -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/torchbayes-*.whl)"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
cd "$work"   # not the repository: its torchbayes/ folder must not shadow the wheel
"$work/venv/bin/python" "$repo/.ci/wheel_smoke.py" "$wheel"
