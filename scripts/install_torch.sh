#!/bin/sh
# Install torch into the given Python only if it has none, preferring a CPU build.
#   scripts/install_torch.sh .venv/bin/python
# A GPU user keeps the torch already importable (the venv is created with
# --system-site-packages when the base Python has torch), or names one:
#   NANOSEEK_TORCH="torch==2.6.0" make test
set -e
py="$1"
if "$py" -c "import torch" 2>/dev/null; then
    echo "torch $("$py" -c 'import torch; print(torch.__version__)') already present"
    exit 0
fi
if [ -n "$NANOSEEK_TORCH" ]; then
    exec "$py" -m pip install "$NANOSEEK_TORCH"
fi
# 1. a CPU wheel this machine already holds (pip's find-links), dependencies from PyPI
"$py" -m pip install "torch==2.13.0+cpu" 2>/dev/null && exit 0
# 2. PyTorch's CPU index: no multi-GB CUDA download on a machine without a GPU
exec "$py" -m pip install torch --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
