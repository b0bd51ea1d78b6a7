"""Working memory of one model step at published widths, from XLA's own buffer accounting.

Each model is cut to a few layers (the memory per layer is what matters) and
built abstractly: no weights or cache are allocated, the step is only lowered
and compiled, and `compiled.memory_analysis()` says what running it would hold:
arguments (weights, caches, metadata), outputs, and temporaries (everything XLA
allocates inside the step). The goal is temporaries that follow the tokens in the
batch, not the size of the weights, the cache, the vocabulary or the experts.

    python benchmarks/step_memory.py [--models gemma4-31b,...] [--dtypes bfloat16,float32] [--steps ...]
                                     [--tp N]        # tensor parallel on N simulated devices: sizes per device
                                     [--init]        # also the dummy-weight init program (load_format="dummy")
                                     [--buffers N]   # also list the N biggest temporaries of each step
                                     [--xla-option NAME=VALUE]  # compile every program with this XLA option
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # for --tp
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine, table  # noqa: E402

PAGE_SIZE = 16
GIB = 2 ** 30


def _gemma4(**fields):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(architectures=["Gemma4ForCausalLM"], **fields)


def _llama4(**fields):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(architectures=["Llama4ForCausalLM"], **fields)


# Published text configs (DESIGN.md §9), with the layer count cut; E2B keeps 10 of its 35
# layers, the last 4 of them KV-shared, Scout 8 of its 16 experts.
SHAPES = {
    "gemma4-31b": lambda layers=2: _gemma4(
        hidden_size=5376, num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504, vocab_size=262144,
        sliding_window=1024, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        num_hidden_layers=layers, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"]),
    "gemma4-e2b": lambda layers=10: _gemma4(
        hidden_size=1536, num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
        intermediate_size=6144, use_double_wide_mlp=True, vocab_size=262144, vocab_size_per_layer_input=262144,
        hidden_size_per_layer_input=256, num_kv_shared_layers=4, sliding_window=512,
        final_logit_softcapping=30.0, num_hidden_layers=layers),
    "llama4-scout": lambda layers=2: _llama4(
        hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        intermediate_size_mlp=16384, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
        vocab_size=202048, attention_chunk_size=8192, num_hidden_layers=layers,
        no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers - 1)] + [0],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "gemma4-26b-a4b": lambda layers=2: _gemma4(
        hidden_size=2816, num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=2112, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, vocab_size=262144, sliding_window=1024,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_hidden_layers=layers,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"]),
}


def write_config(name: str, directory: str | Path, layers: int | None = None) -> Path:
    """A checkpoint folder holding only `config.json` (enough for random or dummy weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = SHAPES[name]() if layers is None else SHAPES[name](layers)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return directory


def abstract_model(checkpoint: str | Path, dtype: str, max_model_len: int, tp: int = 1):
    """The model with abstract parameters (shapes, dtypes and shardings only), on a (1, tp) mesh."""
    from vllm.config import ModelConfig, VllmConfig

    from jaxllm.vllm_plugin.models import DEFAULT_FOR, our_models

    arch = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
    cls = our_models()[DEFAULT_FOR.get(arch, arch)]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:tp]).reshape(1, tp), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    config = VllmConfig(model_config=ModelConfig(model=str(checkpoint), dtype=dtype, max_model_len=max_model_len,
                                                 skip_tokenizer_init=True))
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: cls(config, jax.random.key(0), mesh))
    return model, mesh, lambda: cls(config, jax.random.key(0), mesh)


def lower_dummy_init(create, mesh):
    """tpu-inference's `load_format="dummy"` path: the whole model created in one jitted program, sharded."""
    def init():
        state = nnx.state(create())
        return jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))

    with jax.set_mesh(mesh):
        return jax.jit(init).lower()


def _sharded(tree, specs, mesh):
    return jax.tree.map(lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
                        tree, specs)


def lower_step(model, mesh, *, q_lens: list[int], context: int, max_reqs: int, max_model_len: int):
    """The runner's step (layers, then logits of each request's last token), lowered, caches donated."""
    from tpu_inference.layers.common.attention_metadata import AttentionMetadata

    from jaxllm.attention import CacheLayout

    tp = mesh.shape["model"]
    pages_per_req = -(-max_model_len // PAGE_SIZE)
    num_pages = max_reqs * pages_per_req
    packing = 4 // jnp.dtype(model.dtype).itemsize
    specs = model.config.kv_layers()
    owners = [i for i, s in enumerate(specs) if s.kv_donor is None]
    slot_of = {layer: n for n, layer in enumerate(owners)}
    slot_of.update({i: slot_of[s.kv_donor] for i, s in enumerate(specs) if s.kv_donor is not None})
    layer_slots = tuple((f"layer.{i}", slot_of[i]) for i in range(len(specs)))
    # KV heads sharded over the tensor axis, replicated up to it when fewer (as the runner sizes the cache).
    caches = [jax.ShapeDtypeStruct(CacheLayout(max(specs[i].num_kv_heads, tp), specs[i].head_dim, packing)
                                   .cache_shape(num_pages, PAGE_SIZE), model.dtype,
                                   sharding=NamedSharding(mesh, P(None, None, "model"))) for i in owners]

    total = sum(q_lens)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    metadata = AttentionMetadata(input_positions=i32(total), block_tables=i32(num_pages), seq_lens=i32(max_reqs),
                                 query_start_loc=i32(max_reqs + 1), request_distribution=i32(3))
    graphdef, state = nnx.split(model)
    state = _sharded(state, nnx.get_partition_spec(state), mesh)

    def step(state, caches, ids, metadata, logits_rows):
        m = nnx.merge(graphdef, state)
        caches, hidden, _, _ = m(caches, ids, metadata, None, None, layer_slots)
        return caches, m.compute_logits(hidden[logits_rows])

    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=1).lower(state, caches, i32(total), metadata, i32(len(q_lens)))


STEPS = {  # name -> (new tokens per request, context)
    "decode x1": ([1], 1024),
    "decode x4": ([1] * 4, 1024),
    "prefill 512": ([512], 512),
    "prefill 8x1024": ([1024] * 8, 1024),  # vLLM's default token budget on this platform (8192)
}


def biggest_temporaries(lowered, count: int, options: dict | None = None) -> list[tuple[int, str]]:
    """(bytes, description) of the largest values in the step's temporary buffer, from XLA's buffer assignment.

    Compiles `lowered` once more with the HLO dump on; each value is named by its HLO
    instruction, its shape and the JAX operation it came from (the HLO metadata).
    """
    with tempfile.TemporaryDirectory() as dump:
        lowered.compile(compiler_options={**(options or {}), "xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        files = os.listdir(dump)
        assignment = next(f for f in files if f.endswith("cpu_after_optimizations-buffer-assignment.txt"))
        hlo = next(f for f in files if f.endswith("cpu_after_optimizations.txt"))
        assignment = Path(dump, assignment).read_text()
        hlo = Path(dump, hlo).read_text()
    origin = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            origin[m.group(1)] = m.group(2)
    values = {}
    in_temp = False
    for line in assignment.splitlines():
        if line.startswith("allocation"):
            in_temp = "preallocated-temp" in line
        elif in_temp and (m := re.match(r"\s*value: <\d+ ([\w.\-]+)(?: @[\d]+)?> \(size=(\d+),offset=\d+\): (\S+)",
                                         line)):
            name, size, shape = m.groups()
            values[name] = (int(size), f"{shape.split('{')[0]} {name} ({origin.get(name, '?')[-90:]})")
    return sorted(values.values(), reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--max-reqs", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism on simulated devices; sizes per device")
    parser.add_argument("--init", action="store_true", help="also the dummy-weight init program")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA compile option for every program, e.g. "
                             "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    parser.add_argument("--buffers", type=int, default=0)
    args = parser.parse_args()
    options = dict(option.split("=", 1) for option in args.xla_option)
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            checkpoint = write_config(name, Path(tmp) / name)
            for dtype in args.dtypes.split(","):
                model, mesh, create = abstract_model(checkpoint, dtype, args.max_model_len, args.tp)
                for step in (["dummy init"] if args.init else []) + args.steps.split(","):
                    if step == "dummy init":
                        lowered = lower_dummy_init(create, mesh)
                    else:
                        q_lens, context = STEPS[step]
                        lowered = lower_step(model, mesh, q_lens=q_lens, context=context, max_reqs=args.max_reqs,
                                             max_model_len=args.max_model_len)
                    mem = lowered.compile(compiler_options=options).memory_analysis()
                    rows.append([name, dtype, args.tp, step, fmt(mem.argument_size_in_bytes / GIB),
                                 fmt(mem.output_size_in_bytes / GIB), fmt(mem.alias_size_in_bytes / GIB),
                                 fmt(mem.temp_size_in_bytes / GIB)])
                    print(" | ".join(map(str, rows[-1])), flush=True)
                    for size, what in biggest_temporaries(lowered, args.buffers, options) if args.buffers else ():
                        print(f"    {size / 2 ** 20:9.1f} MiB  {what}")
    print(table(["model", "dtype", "TP", "step", "arguments GiB", "outputs GiB", "aliased GiB", "temporaries GiB"], rows))


if __name__ == "__main__":
    main()
