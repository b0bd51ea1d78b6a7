"""A step's working memory follows the tokens in the batch, not the weights or the vocabulary.

Gemma 4 31B's published widths (hidden 5376, 32 heads, 16 KV heads of 256 and 4
global ones of 512 with k = v, MLP 21504, vocabulary 262144) cut to two layers, one
sliding and one full, in bf16. Nothing is allocated: parameters and caches are
abstract, and the step is only compiled; XLA's `memory_analysis()` says how much
it would hold besides its arguments (`temp_size_in_bytes`).

The steps are the shapes tpu-inference's runner sends: at least 16 tokens (its
smallest bucket on TPU) and at least 8 logits rows. (A step of a single token or a
single logits row makes XLA's CPU backend convert every weight to fp32, since it has
no bf16 matrix-vector kernel: 9.0 GiB for 4.6 GiB of weights. Off TPU, jaxllm's bucket
patches let the runner go down to 2 rows, and to 1 token only for fp32 models:
`jaxllm.vllm_plugin.host.MIN_ROWS`.) Before the fixes, each o_proj was transposed at every step (0.25 GiB) and
the jitted dummy-weight init held 27.6 GiB.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tpu_inference.layers.common.attention_metadata import AttentionMetadata
from vllm.config import ModelConfig, VllmConfig

from jaxllm.attention import portable
from jaxllm.attention.portable import CacheLayout
from jaxllm.model.gemma4 import JaxGemma4ForCausalLM

MAX_MODEL_LEN = 1024
MAX_REQS = 4
PAGE_SIZE = 16


@pytest.fixture(scope="module")
def gemma4_31b_widths(tmp_path_factory):
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig(
        architectures=["Gemma4ForCausalLM"], hidden_size=5376, num_attention_heads=32, num_key_value_heads=16,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=4, attention_k_eq_v=True,
        intermediate_size=21504, vocab_size=262144, sliding_window=1024, final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    folder = tmp_path_factory.mktemp("gemma4-31b-2-layers")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    vllm_config = VllmConfig(model_config=ModelConfig(model=str(folder), dtype="bfloat16",
                                                      max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    create = lambda: JaxGemma4ForCausalLM(vllm_config, jax.random.key(0), mesh)  # noqa: E731
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(create)
    return model, mesh, create


def step_temporaries(model, mesh, num_tokens: int, logits_rows: int = 8) -> int:
    """Bytes of temporaries of a decode step of `num_tokens` tokens (1k context), `logits_rows` logits."""
    specs = model.config.kv_layers()
    num_pages = MAX_REQS * MAX_MODEL_LEN // PAGE_SIZE
    caches = [jax.ShapeDtypeStruct(CacheLayout(s.num_kv_heads, s.head_dim, 2).cache_shape(num_pages, PAGE_SIZE),
                                   jnp.bfloat16) for s in specs]
    layer_slots = tuple((f"layer.{i}", i) for i in range(len(specs)))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    metadata = AttentionMetadata(input_positions=i32(num_tokens), block_tables=i32(num_pages),
                                 seq_lens=i32(MAX_REQS), query_start_loc=i32(MAX_REQS + 1),
                                 request_distribution=i32(3))
    graphdef, state = nnx.split(model)

    def step(state, caches, ids, metadata, logits_rows):  # the runner's step, then its deferred logits
        m = nnx.merge(graphdef, state)
        caches, hidden, _, _ = m(caches, ids, metadata, None, None, layer_slots)
        return caches, m.compute_logits(hidden[logits_rows])

    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=1).lower(state, caches, i32(num_tokens), metadata,
                                                         i32(logits_rows)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def working_set_bound(config, num_tokens: int) -> int:
    """What a step may hold: per token, 8 fp32 rows of the widest activation; per cache row layout,
    one KV block of a decode tile of the portable attention, gathered (bf16) and as fp32 K and V.

    Nothing here grows with the weights, the vocabulary or the KV pool. For these widths:
    1.8 MiB per token and 120 MiB of attention blocks.
    """
    widest = max(config.hidden_size, *(layer.intermediate_size for layer in config.layers),
                 *(config.num_heads * layer.head_dim for layer in config.layers))
    tokens = num_tokens * 8 * 4 * widest
    row_values = {2 * layer.num_kv_heads * layer.head_dim for layer in config.layers}  # K and V of a token
    tiling = portable.Tiling()
    block = tiling.decode_tile * tiling.decode_kv_tokens
    attention = sum(block * values * (2 + 2 * 4) for values in row_values)
    return tokens + attention


@pytest.mark.parametrize("num_tokens, logits_rows", [(2, 2), (16, 8), (64, 8)])
def test_decode_step_temporaries_follow_tokens(gemma4_31b_widths, num_tokens, logits_rows):
    """(2, 2): the smallest bf16 step the runner sends off TPU (jaxllm.vllm_plugin.host.MIN_ROWS)."""
    model, mesh, _ = gemma4_31b_widths
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    temporaries = step_temporaries(model, mesh, num_tokens, logits_rows)
    bound = working_set_bound(model.config, num_tokens)
    assert bound < weights / 16  # the bound is far below anything weight-sized
    assert temporaries <= bound, (f"{temporaries / 2**20:.0f} MiB of temporaries for {num_tokens} token(s), "
                                  f"bound {bound / 2**20:.0f} MiB ({weights / 2**30:.1f} GiB of weights)")


def test_dummy_weight_init_writes_weights_in_place(gemma4_31b_widths):
    """tpu-inference's `load_format="dummy"` creates the whole model in one jitted program."""
    _, mesh, create = gemma4_31b_widths

    def init():
        state = nnx.state(create())
        return jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))

    with jax.set_mesh(mesh):
        memory = jax.jit(init).lower().compile().memory_analysis()
    assert memory.temp_size_in_bytes <= memory.output_size_in_bytes / 1000
