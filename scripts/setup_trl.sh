#!/usr/bin/env bash
# TRL's environment for the benchmark (bench_trl.py, issue 6) in <repo>/.venv-trl, apart from the
# project's .venv: TRL is not a project dependency. Idempotent: skips pip while requirements-bench.txt
# is unchanged since the last success.
# Usage: bash scripts/setup_trl.sh   (from any directory)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # repo root
ROOT=$(pwd)
VENV="$ROOT/.venv-trl"
PY="$VENV/bin/python"
# PyPI's torch 2.13.0 is a CUDA build (~GBs of nvidia wheels); the +cpu build lives on this index.
CPU_INDEX=https://download.pytorch.org/whl/cpu

# pip, quiet, minus one harmless warning per package that this machine's file:// extra indexes
# (pip config) lack ("Location ... is ignored"). pip's own exit status is kept (pipefail).
pip_q() {
    { "$PY" -m pip -q "$@" 2>&1 1>&3 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; } 3>&1
}

if [ ! -x "$PY" ]; then
    echo "setup_trl: creating $VENV"
    python3 -m venv "$VENV"
fi

STAMP="$VENV/.requirements-bench.sha256"
WANT=$(sha256sum requirements-bench.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$WANT" ]; then
    echo "setup_trl: requirements-bench.txt already installed (delete $STAMP to force)"
    exit 0
fi

echo "setup_trl: installing requirements-bench.txt"
rm -f "$STAMP"
pip_q install --upgrade pip
# torch and torchvision alone first, from the CPU index, without their dependencies: the index is
# consulted for these two projects only (every other package comes from the default index), and
# the second install below, which names the same pins, resolves their dependencies. Where the CPU
# index is unreachable pip warns, retries twice and falls back to the indexes in its config.
PINS=$(grep -E '^(torch|torchvision)==' requirements-bench.txt)
pip_q install --no-deps --retries 2 --extra-index-url "$CPU_INDEX" $PINS
pip_q install -r requirements-bench.txt

# A torchvision from PyPI is a CUDA build that fails to import next to the CPU torch; the project's
# scripts/torchvision_cpu_fix.py makes its pure-Python part (all the Qwen2.5-VL processor uses)
# importable. Installed as a .pth hook only when needed: with a real CPU torchvision it would clash.
SP=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$SP/torchvision_cpu_fix.py" "$SP/torchvision_cpu_fix.pth"
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    echo "setup_trl: torchvision is not a CPU build; installing scripts/torchvision_cpu_fix.py"
    cp scripts/torchvision_cpu_fix.py "$SP/torchvision_cpu_fix.py"
    echo "import torchvision_cpu_fix" > "$SP/torchvision_cpu_fix.pth"
fi

echo "setup_trl: checking imports"
if ! "$PY" -c "import torch, torchvision, transformers, trl, datasets, math_verify
print('setup_trl: trl', trl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"; then
    echo "setup_trl: ERROR: import check failed (see the traceback above)" >&2
    exit 1
fi
echo "$WANT" > "$STAMP"
echo "setup_trl: OK ($VENV)"
