"""Run graftune as an AVX2-only CPU would, on a CPU that has avx512/AMX (``make test-avx2``).

Python imports this module at start-up when its folder is on ``PYTHONPATH`` (``sitecustomize``), so every process
of the suite gets it, the CLI subprocesses and xdist workers included. It hides the avx512* and amx* flags from
whatever reads /proc/cpuinfo through ``pathlib`` (graftune's ``speed.precision.cpu_features``, and the CPU line
``graftune bench`` records): the ``auto`` precision is then float32, as on an AVX2-only CPU. The Makefile target
also caps oneDNN, MKL, ATen, numpy's SIMD dispatch and OpenBLAS at AVX2 (``ONEDNN_MAX_CPU_ISA`` etc.), so a bf16
matrix product that still slips through is emulated and slow (~40x float32 on this avx512_bf16 CPU, measured in
bench/RESULTS.md), as it is on such a CPU: a test that depends on bf16 speed shows up among the slowest. ONNX
Runtime's kernels are not capped.
"""

import pathlib

_read_text = pathlib.Path.read_text
_HIDDEN = ("avx512", "amx")


def hide_wide_flags(text: str) -> str:
    """The text of /proc/cpuinfo without its avx512* and amx* flags."""
    lines = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            line = f"{key}: {' '.join(f for f in value.split() if not f.startswith(_HIDDEN))}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _read_text_without_wide_flags(self, *args, **kwargs):
    text = _read_text(self, *args, **kwargs)
    return hide_wide_flags(text) if str(self) == "/proc/cpuinfo" else text


pathlib.Path.read_text = _read_text_without_wide_flags
