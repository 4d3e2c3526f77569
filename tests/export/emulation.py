"""Run Python under QEMU's user-mode emulation of an AVX2 CPU without VNNI (Haswell).

ONNX Runtime chooses its uint8 x int8 kernel by CPUID. QEMU reports the emulated CPU's features
and executes VPMADDUBSW with its int16 saturation, so on any x86-64 host this pins the saturating
kernel that CPUs without VNNI run. Debian's `qemu-user` provides `qemu-x86_64`
(scripts/install_system_deps.sh); tests skip, naming it, where it is missing.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
AVX2_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI
REPO = Path(__file__).resolve().parents[2]

needs_qemu = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason="needs qemu-x86_64 (Debian qemu-user) on an x86-64 host to emulate an AVX2 CPU without VNNI")


def run_on_avx2(code: str, timeout: float = 600) -> dict:
    """Run `code` (which prints one JSON object last) in this venv's Python on the emulated CPU."""
    done = subprocess.run([QEMU, "-cpu", AVX2_CPU, sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
