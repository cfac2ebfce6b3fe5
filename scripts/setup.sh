#!/usr/bin/env bash
# Create .venv (if absent) and install fedunlearn with its test tools. Safe to rerun.
#
# torch: when none is installed, a GPU machine (nvidia-smi lists a GPU) gets pip's default
# (CUDA) build; any other machine gets the CPU build torch==2.13.0 (set FEDUNLEARN_TORCH_INDEX,
# e.g. to PyTorch's CPU wheel index, where PyPI's wheel is a CUDA build). A torch you installed
# yourself into .venv is kept: the project only asks for torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# --no-compile, then one parallel compileall below: pip byte-compiles serially (about half of
# a fresh set-up on 2 cores). Without any compiling, the first test run's many processes (Ray
# workers, pytest workers) would each compile torch and ray themselves: measured 8 min instead
# of 4 for the first ./scripts/test.sh.

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing pip's default torch build"
    "${PIP[@]}" install --no-compile "torch>=2.2"
  else
    echo "[setup] no GPU: installing the CPU build torch==2.13.0"
    "${PIP[@]}" install --no-compile "torch==2.13.0" ${FEDUNLEARN_TORCH_INDEX:+--index-url "$FEDUNLEARN_TORCH_INDEX" --extra-index-url https://pypi.org/simple}
  fi
fi

stamp=.venv/.fedunlearn-setup
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing fedunlearn and its dependencies (first time: about 1-2 minutes)"
  # uv (which flwr itself requires, hence the same range) resolves and installs the ~100
  # packages in seconds where pip spends about 25 s resolving alone (measured here); pip does
  # it when uv is not at hand. torch is in place already, so neither changes it.
  "${PIP[@]}" install --no-compile "uv>=0.12.20,<0.13" >/dev/null 2>&1 || true
  if ! { [ -x .venv/bin/uv ] && .venv/bin/uv pip install --quiet --python .venv/bin/python -e ".[dev]"; }; then
    "${PIP[@]}" install --no-compile -e ".[dev]"
  fi
  # test suites and pip/setuptools (nothing here imports them; about a quarter of the files)
  # are skipped (sympy is not: torch imports it with torch._dynamo at the first optimizer step)
  .venv/bin/python -m compileall -q -j 0 -x '/(tests?|testing/_internal)/|/site-packages/(pip|setuptools)/' \
    "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
  echo "$want" > "$stamp"
fi
# fedunlearn's own modules too (every Ray worker and pytest worker imports them; with
# PYTHONDONTWRITEBYTECODE set nothing else would write them; stale files are recompiled)
.venv/bin/python -m compileall -q -j 0 fedunlearn >/dev/null || true
