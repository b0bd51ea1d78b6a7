"""jaxllm: Flax-NNX Llama 4 and Gemma 4 served by vLLM through tpu-inference."""
