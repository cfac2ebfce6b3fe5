"""Provenance stamped on every result file: versions and git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import fedunlearn


def versions() -> dict[str, str]:
    """Versions of fedunlearn, Python and the stack it runs on, and the CPU instruction set
    torch's kernels use."""
    out = {"fedunlearn": fedunlearn.__version__, "python": platform.python_version()}
    for dist in ("flwr", "ray", "torch", "numpy", "flwr-datasets", "scikit-learn"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    # Training trajectories depend on the CPU's vector instructions (torch's kernels round
    # differently with AVX2 and AVX-512; docs/benchmarks.md, "Figures depend on the CPU").
    out["machine"] = platform.machine()
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return out


def git_commit() -> str:
    """``HEAD`` of the checkout fedunlearn runs from (``+dirty`` with uncommitted changes)."""
    root = Path(fedunlearn.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=False).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
