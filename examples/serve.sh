#!/usr/bin/env bash
# OpenAI-compatible server with the jaxllm plugin:
#   examples/serve.sh [--model PATH_OR_HUB_NAME] [--host 127.0.0.1] [--port 8000] [other `vllm serve` flags]
# Without --model it serves a small locally built Llama 4 checkpoint (random weights).
# Defaults: --max-model-len 1024 --max-num-seqs 16; flags given here come later and win.
# Off TPU, JAX runs on the CPU and weights + KV cache take 10% of RAM unless
# --gpu-memory-utilization says otherwise.
# Query it with examples/client.py.
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

# The rule of jaxllm.platform.on_tpu, in shell: importing the plugin
# imports vLLM, which alone takes seconds.
tpu_present() {
  if [ -n "${JAX_PLATFORMS:-}" ]; then
    [[ $JAX_PLATFORMS == *tpu* || $JAX_PLATFORMS == *proxy* ]]
  else
    compgen -G '/dev/accel*' >/dev/null || ls /dev/vfio 2>/dev/null | grep -qx '[0-9]\+'
  fi
}

defaults=(--max-model-len 1024 --max-num-seqs 16)
if ! tpu_present; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  defaults+=(--gpu-memory-utilization 0.1)
fi
echo ">> serving $model on http://$host:$port/v1 (query it: python examples/client.py --base-url http://$host:$port/v1)"
exec "$(dirname "$PY")/vllm" serve "$model" --host "$host" --port "$port" "${defaults[@]}" "${extra[@]}"
