#!/usr/bin/env bash
# OpenAI-compatible server with the jaxllm plugin:
#   examples/serve.sh [--model PATH] [--host 127.0.0.1] [--port 8000] [extra `vllm serve` flags]
# Without --model it serves a small locally built Llama 4 checkpoint (random weights).
# Off TPU, JAX runs on the CPU and the KV cache takes 10% of RAM unless
# --gpu-memory-utilization says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
model="" host=127.0.0.1 port=8000 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ -z "$model" ]; then
  model=$("$PY" -c 'from jaxllm.checkpoints import cached_checkpoint; print(cached_checkpoint("llama4", "tiny"))')
fi
defaults=(--max-model-len 1024 --max-num-seqs 16)
if "$PY" -c 'import sys; from jaxllm.vllm_plugin.host import tpu_present; sys.exit(1 if tpu_present() else 0)'; then
  # Not a TPU host.
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  defaults+=(--gpu-memory-utilization 0.1)
fi
echo ">> serving $model on http://$host:$port/v1"
exec "$(dirname "$PY")/vllm" serve "$model" --host "$host" --port "$port" "${defaults[@]}" "${extra[@]}"
