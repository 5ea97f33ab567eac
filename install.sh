#!/usr/bin/env bash
# Install crossdiff into ./.venv from nothing. torch goes in first and is pinned by constraints.txt,
# so no later package can swap it for another build. A CUDA user installs a CUDA build of
# torch==2.13.0 into .venv before running this script; it is kept as it is.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
if .venv/bin/python -m pip show torchvision >/dev/null 2>&1; then
    echo "torchvision got installed; it breaks this environment (see README)" >&2
    exit 1
fi
echo "crossdiff installed in .venv ($(.venv/bin/crossdiff --version))"
