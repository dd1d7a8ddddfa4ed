# Every target builds .venv itself. torch is pinned to the CPU wheel first so that the
# project's own `torch>=2.4` requirement is already satisfied and pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot,eval]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

demo: $(VENV)/.installed
	$(PY) -m llmneo demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache

# Loss-only, training-step and on-policy benchmarks (CPU; `BENCH_ARGS=--device cuda` on a GPU). Liger is optional.
bench: $(VENV)/.installed
	$(PY) -m pip install -q liger-kernel || echo "liger-kernel not installed: the Liger row is skipped"
	$(PY) benchmarks/loss_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/step_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/onpolicy_bench.py $(BENCH_ARGS)
