# Every target builds the environment first when it is missing (tools/venv.sh).
PY := .venv/bin/python
# A TPU VM exposes /dev/accel* (v4, v5p) or numbered /dev/vfio entries (v5e, v6e), as
# jaxllm.platform.on_tpu checks; anywhere else run JAX on the CPU.
JAX_PLATFORMS ?= $(shell ls /dev/accel* >/dev/null 2>&1 || ls /dev/vfio 2>/dev/null | grep -qx '[0-9][0-9]*' || echo cpu)
export JAX_PLATFORMS
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra flags for the examples, e.g. make demo ARGS="--size small --num-prompts 64"
ARGS ?=

.PHONY: venv demo serve client test test-all smoke bench clean-venv-link

venv:
	@bash tools/venv.sh

demo: venv
	$(PY) examples/offline_batch.py $(ARGS)

# Serves until interrupted; query it from another shell with `make client`.
serve: venv
	bash examples/serve.sh --host $(HOST) --port $(PORT) $(ARGS)

client: venv
	$(PY) examples/client.py --base-url http://$(HOST):$(PORT)/v1 $(ARGS)

# 22-30 minutes on an idle 2-core machine (22:05 and 30:19 in two runs of .ci/run on clean clones, the VM's speed varies);
# test-all adds the cases marked slow (pytest -m slow).
test: venv
	$(PY) -m pytest -q -m "not slow" tests

test-all: venv
	$(PY) -m pytest -q tests

# The published Llama 4 / Gemma 4 shapes (layers cut) through vllm.LLM at TP 8 and 4: about 30 minutes.
smoke: venv
	$(PY) tests/real_shapes.py $(ARGS)

bench: venv
	$(PY) benchmarks/run_all.py

clean-venv-link:
	rm -f .venv
