#!/usr/bin/env bash
# Create .venv/ in the repository root and install aimspax-like (with test extras) into it.
#
# torch is installed first and on its own: on Linux a plain `pip install torch==...` resolves to
# the multi-GB CUDA build, even on a machine without a GPU.
#   - no NVIDIA GPU (no nvidia-smi): the CPU build (torch==2.13.0 by default) from PyTorch's own
#     CPU wheel index (AIMSPAX_TORCH_INDEX, default https://download.pytorch.org/whl/cpu); when
#     that index cannot be reached, the plain requirement from your usual index instead;
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
        "${PIP[@]}" install "$TORCH_SPEC"
    else
        CPU_INDEX=${AIMSPAX_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
        echo "setup: no GPU found, installing the CPU build $TORCH_SPEC from $CPU_INDEX"
        if ! "${PIP[@]}" install --retries 1 --timeout 30 --index-url "$CPU_INDEX" "$TORCH_SPEC"; then
            echo "setup: $CPU_INDEX could not be used; installing $TORCH_SPEC from the usual index"
            "${PIP[@]}" install "$TORCH_SPEC"
        fi
    fi
fi
.venv/bin/python -c "import torch; print('setup: torch', torch.__version__, '| CUDA build:', torch.version.cuda is not None)"
"${PIP[@]}" install -e ".[test]"
.venv/bin/python -c "import torch, mace, parsl, aimspax_like; print('setup: torch', torch.__version__, '| aimspax-like', aimspax_like.__version__)"
