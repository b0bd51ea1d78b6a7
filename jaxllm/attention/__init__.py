"""Ragged paged attention over tpu-inference's paged KV-cache layout."""

from jaxllm.attention.portable import CacheLayout, ragged_paged_attention

__all__ = ["CacheLayout", "ragged_paged_attention"]
