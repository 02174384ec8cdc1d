#!/usr/bin/env bash
# Create .venv/ in the repository root and install aimspax-like (with test extras) into it.
#
# torch is installed first and on its own, so that pip never resolves a bare `torch` to a
# multi-GB CUDA build on a CPU-only machine:
#   - no NVIDIA GPU (no nvidia-smi): the CPU build, torch==2.13.0 by default;
#   - a GPU: whatever AIMSPAX_TORCH says (default: torch==2.13.0 from PyPI, a CUDA build).
# Override with e.g. AIMSPAX_TORCH="torch==2.6.0" or set PIP_INDEX_URL / PIP_EXTRA_INDEX_URL
# to your site's wheel mirror. An existing .venv is reused (delete it to start clean).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
TORCH_SPEC=${AIMSPAX_TORCH:-torch==2.13.0}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "setup: GPU found, installing $TORCH_SPEC"
    else
        echo "setup: no GPU found, installing the CPU build $TORCH_SPEC"
    fi
    "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -e ".[test]"
.venv/bin/python -c "import torch, mace, parsl, aimspax_like; print('setup: torch', torch.__version__, '| aimspax-like', aimspax_like.__version__)"
