"""Run graftune as an AVX2-only CPU would, on a CPU that has avx512/AMX (``make test-avx2``).

Python imports this module at start-up when its folder is on ``PYTHONPATH`` (``sitecustomize``), so every process
of the suite gets it, the CLI subprocesses and xdist workers included. It hides the avx512* and amx* flags from
graftune's one reader of /proc/cpuinfo (``speed.precision.cpu_features``): the ``auto`` precision is then float32,
as on an AVX2-only CPU. The Makefile target also caps oneDNN, MKL and ATen at AVX2 (``ONEDNN_MAX_CPU_ISA`` etc.), so
a bf16 matrix product that still slips through is emulated and slow (~40x float32 on this avx512_bf16 CPU, measured
in bench/RESULTS.md), as it is on such a CPU: a test that depends on bf16 speed shows up as slow or timed out.
"""

import pathlib

_read_text = pathlib.Path.read_text
_HIDDEN = ("avx512", "amx")


def _without_wide_flags(self, *args, **kwargs):
    text = _read_text(self, *args, **kwargs)
    if str(self) != "/proc/cpuinfo":
        return text
    lines = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            line = f"{key}: {' '.join(f for f in value.split() if not f.startswith(_HIDDEN))}"
        lines.append(line)
    return "\n".join(lines) + "\n"


pathlib.Path.read_text = _without_wide_flags
