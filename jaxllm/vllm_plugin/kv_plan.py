"""The window-aware KV-cache plan: which vLLM spec each of our layers gets, and how pages are laid out.

tpu-inference 0.32.0 gives every layer of its JAX models a full-length cache. For
jaxllm's models the plan gives vLLM its own specs instead: sliding layers
`SlidingWindowSpec`, Llama 4's chunked layers `ChunkedLocalAttentionSpec`, the
others `FullAttentionSpec`, and KV-shared layers point at their donor. vLLM then
keeps one KV-cache group per kind and returns a sliding or chunked layer's blocks
to the pool once they leave its window.

Pages. vLLM's hybrid allocator needs one page size (bytes per block) for every
layer, but Gemma 4's sliding and global layers store different rows (for example
16 heads x 256 vs 4 heads x 512 per token):
- off TPU, each row layout gets a block size that makes its page the size of the
  largest page (sliding 16 tokens, global 32); all groups share one pool, every
  buffer is stored in one layout (`KVCachePlan.storage`) and each layer views it
  in its own, a free reshape of the local shard (`jaxllm.attention.dispatch`);
- on a TPU that reshape is not free (its memory is tiled), so every layer keeps
  the base block size, each row layout gets a buffer of its own, and vLLM counts
  the sum of the layouts' pages per block.
Where the window-aware cache would hold as much per request as full-length caches
(short contexts, or TPU's summed pages), the plan is None: full-length caches.

`JAXLLM_WINDOWED_KV_CACHE`:
- `auto` (default): as above; where the window-aware cache is impossible (no whole
  block size unifies the pages, or vLLM's hybrid manager is off), a warning and
  full-length caches;
- `0`: full-length caches, as tpu-inference's own models have them;
- `1`: start-up fails where the window-aware cache is impossible. Where it is
  possible but saves nothing at this `max_model_len`, caches stay full length, as
  with `auto` (logged at info level).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Sequence

from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import (AttentionSpec, ChunkedLocalAttentionSpec, FullAttentionSpec,
                                        SlidingWindowSpec)

from jaxllm.model.config import KVLayer

logger = init_logger("vllm.jaxllm")

MODE_ENV = "JAXLLM_WINDOWED_KV_CACHE"


class Mode(enum.Enum):
    AUTO = "auto"
    OFF = "0"
    REQUIRED = "1"


def mode() -> Mode:
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    try:
        return Mode(value)
    except ValueError:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {[m.value for m in Mode]}") from None


class WindowedKVCacheError(RuntimeError):
    """JAXLLM_WINDOWED_KV_CACHE=1, but this model or configuration can't have it."""


@dataclasses.dataclass(frozen=True)
class KVCachePlan:
    specs: dict[str, AttentionSpec]   # "layer.{i}" -> spec, for layers with a cache of their own
    shared_layers: dict[str, str]     # KV-shared "layer.{i}" -> its donor's name
    storage: AttentionSpec | None     # off TPU with several row layouts: the layout every buffer is
                                      # stored in (layers view it in theirs); None: each layer's own
    summary: str                      # for the start-up log


Row = tuple[int, int]  # (KV heads, head size), padded as tpu-inference pads them for the mesh


@dataclasses.dataclass(frozen=True)
class _Pages:
    """One page size for every layer: each row layout's block size, and the bytes vLLM counts per block."""
    block_size: dict[Row, int]
    page_bytes: int


def plan(layers: Sequence[KVLayer], runner, *, on_tpu: bool) -> KVCachePlan | None:
    """The plan for a model with these attention layers on `runner` (tpu-inference's), or None for full length."""
    if mode() is Mode.OFF:
        return None
    max_len = runner.model_config.max_model_len
    windows = [_window(layer, max_len) for layer in layers]
    if all(kind == "full" for kind, _ in windows):
        return None  # no layer ever sees less than the whole context
    if runner.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return _refuse("vLLM's hybrid KV-cache manager is disabled (--disable-hybrid-kv-cache-manager, "
                       "or a KV connector without hybrid support), and without it vLLM keeps one "
                       "full-length group")

    own = {i: layer for i, layer in enumerate(layers) if layer.kv_donor is None}
    row_of = {i: _padded_row(layer, runner) for i, layer in own.items()}
    base_page = {row: _page_bytes(row, runner.cache_config.block_size, runner) for row in set(row_of.values())}
    pages = _one_page_size(base_page, runner.cache_config.block_size, on_tpu)
    if pages is None:
        return None
    specs = {f"layer.{i}": _spec(windows[i], row_of[i], pages, runner.kv_cache_dtype) for i in own}

    # At short contexts a window plus the tokens in flight is the whole context, and summed
    # pages (TPU) cost more still: compare what one request of max_model_len holds, as vLLM sizes it.
    windowed = sum(spec.max_memory_usage_bytes(runner.vllm_config) for spec in specs.values())
    full = sum(base_page[row_of[i]] * -(-max_len // runner.cache_config.block_size) for i in own)
    if windowed >= full:
        # (once: the manager plans twice, for the specs and for the buffers)
        logger.info_once("jaxllm: full-length KV cache: at max_model_len %d windows save nothing (%.1f MiB "
                         "per request with them, %.1f without)", max_len, windowed / 2**20, full / 2**20)
        return None

    shared = {f"layer.{i}": f"layer.{layer.kv_donor}" for i, layer in enumerate(layers)
              if layer.kv_donor is not None}
    storage = None
    if not on_tpu and len(base_page) > 1:
        widest = max(base_page, key=base_page.get)
        storage = FullAttentionSpec(block_size=pages.block_size[widest], num_kv_heads=widest[0],
                                    head_size=widest[1], dtype=runner.kv_cache_dtype, page_size_padded=pages.page_bytes)
    counts = {kind: sum(1 for i in own if windows[i][0] == kind) for kind in sorted({k for k, _ in windows})}
    summary = (", ".join(f"{n} {kind}" for kind, n in counts.items())
               + (f", {len(shared)} KV-shared" if shared else "")
               + (f"; rows {sorted(base_page)} share {pages.page_bytes}-byte pages" if len(base_page) > 1 else ""))
    return KVCachePlan(specs, shared, storage, summary)


def _window(layer: KVLayer, max_len: int) -> tuple[str, int | None]:
    """("sliding" | "chunked" | "full", its size); a window as long as any sequence is full attention."""
    if layer.sliding_window is not None and layer.sliding_window < max_len:
        return "sliding", layer.sliding_window
    if layer.chunk_size is not None and layer.chunk_size < max_len:
        return "chunked", layer.chunk_size
    return "full", None


def _padded_row(layer: KVLayer, runner) -> Row:
    from tpu_inference.layers.common.sharding import ShardingAxisName
    from tpu_inference.utils import get_mesh_shape_product, get_padded_head_dim, get_padded_num_heads

    tp = get_mesh_shape_product(runner.mesh, ShardingAxisName.ATTN_HEAD)
    return get_padded_num_heads(layer.num_kv_heads, tp), get_padded_head_dim(layer.head_dim)


def _page_bytes(row: Row, block_size: int, runner) -> int:
    """Bytes of one `block_size`-token page of `row`, as tpu-inference lays it out."""
    from tpu_inference.runner.kv_cache import get_attention_page_size_bytes

    return int(get_attention_page_size_bytes(runner.mesh, block_size, *row, runner.kv_cache_dtype, False,
                                             runner.attention_backend))


def _one_page_size(base_page: dict[Row, int], base_block: int, on_tpu: bool) -> _Pages | None:
    if len(base_page) == 1 or not on_tpu:
        largest = max(base_page.values())
        block_size = {}
        for row, page in base_page.items():
            ratio, rest = divmod(largest, page)
            if rest:
                return _refuse(f"KV rows {sorted(base_page)} (heads, head size) have pages of "
                               f"{sorted(base_page.values())} bytes per {base_block}-token block, which no "
                               "whole block size makes equal")
            block_size[row] = base_block * ratio
        return _Pages(block_size, largest)
    # TPU, several row layouts: a buffer each, and vLLM's budget counts both per block.
    return _Pages(dict.fromkeys(base_page, base_block), sum(base_page.values()))


def _spec(window: tuple[str, int | None], row: Row, pages: _Pages, dtype) -> AttentionSpec:
    common = dict(block_size=pages.block_size[row], num_kv_heads=row[0], head_size=row[1], dtype=dtype,
                  page_size_padded=pages.page_bytes)
    kind, size = window
    if kind == "sliding":
        return SlidingWindowSpec(sliding_window=size, **common)
    if kind == "chunked":
        return ChunkedLocalAttentionSpec(attention_chunk_size=size, **common)
    return FullAttentionSpec(**common)


def _refuse(reason: str) -> None:
    if mode() is Mode.REQUIRED:
        raise WindowedKVCacheError(f"{MODE_ENV}=1, but the window-aware KV cache is not possible: {reason}")
    logger.warning_once("jaxllm: window-aware KV cache OFF, every layer keeps the full context: %s "
                        "(set %s=0 to silence this)", reason, MODE_ENV)
    return None
