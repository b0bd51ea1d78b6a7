"""Quantized weights in-process: FP8 checkpoints in Llama 4 Maverick's format, and Qwix rules on our models.

- FP8 checkpoints: which `quantization_config` is read (a typed config) and which are
  refused by name; a tiny Llama 4 with its routed experts in Maverick FP8's format
  (built with compressed-tensors, `fp8_checkpoints.py`) loads with its experts kept in
  FP8 and its logits match transformers' on the same checkpoint dequantized by
  compressed-tensors: fp32 within 1e-4, the tolerance of every other HF parity test
  (our dequantization, fp8 -> fp32 times the fp32 scale, is exactly compressed-tensors',
  so only summation order differs; a scale on the wrong axis or a transposed expert
  moves logits by O(0.1) or more).
- Qwix rules, applied by tpu-inference's own path (`_get_nnx_model`, with the plugin's
  patches): the quantized model equals, bitwise, the unquantized model whose weights
  are replaced by their dequantized values ("fake quantization"), routed experts
  included; with weight-only rules the arithmetic is the same (Qwix dequantizes and
  multiplies in the model's dtype), so any wrong layout, axis or scale shows.
  Rules that can't work fail at start-up with the rule named.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import Gemma4TextConfig, Llama4TextConfig

import fp8_checkpoints
from harness import Engine, hf_logits, load_model
from jaxllm.checkpoints import GEMMA4_MOE, cached_checkpoint
from jaxllm.model.config import Gemma4Config, Llama4Config, UnsupportedConfigError
from jaxllm.model.llama4 import JaxLlama4ForCausalLM

ATOL = 1e-4
SEQ = [0] + np.random.default_rng(0).integers(3, 1000, size=39).tolist()
INT8 = [{"module_path": ".*", "weight_qtype": "int8"}]


# ---------------------------------------------------------------------------
# Which quantization_config is accepted.


def llama4_config(**overrides) -> Llama4TextConfig:
    return Llama4TextConfig(num_hidden_layers=4, num_local_experts=4, interleave_moe_layer_step=2, **overrides)


def maverick(config: Llama4TextConfig, edit=None) -> dict:
    """Maverick FP8's quantization_config for `config` (every Linear but the routed experts ignored, by name)."""
    from jaxllm.model.config import _llama4_modules

    modules = _llama4_modules(config, config)
    experts = set(modules.routed_experts())
    quantization = fp8_checkpoints.quantization_config([n for n in modules.all() if n not in experts])
    if edit is not None:
        edit(quantization)
    return quantization


def test_maverick_fp8_config_is_read_into_a_typed_config():
    config = llama4_config()
    assert Llama4Config.from_hf(config).fp8_experts is None
    config.quantization_config = maverick(config)
    fp8 = Llama4Config.from_hf(config).fp8_experts
    assert fp8.weight_dtype == "float8_e4m3fn" and fp8.activations == "dynamic per-token float8"
    # Patterns as well as names: everything but the experts ignored by two regular expressions and a name.
    config.quantization_config = maverick(config, lambda q: q.__setitem__("ignore", [
        "re:.*self_attn.*", "re:.*feed_forward\\.(router|shared_expert|gate_proj|up_proj|down_proj).*", "lm_head"]))
    assert Llama4Config.from_hf(config).fp8_experts is not None


def _set(key, value):
    return lambda q: q.__setitem__(key, value)


def _weights(**changes):
    return lambda q: q["config_groups"]["group_0"]["weights"].update(changes)


REFUSED = {
    # quant_method other than compressed-tensors, by name
    "fbgemm_fp8": (_set("quant_method", "fbgemm_fp8"), "quant_method='fbgemm_fp8'"),
    "fp8": (_set("quant_method", "fp8"), "quant_method='fp8'"),
    "awq": (_set("quant_method", "awq"), "quant_method='awq'"),
    # compressed-tensors, but not Maverick's scheme
    "block-scales": (_weights(strategy="block", block_structure=[128, 128]), "weights"),
    "int8-weights": (_weights(type="int"), "weights"),
    "kv-cache-scales": (_set("kv_cache_scheme", {"num_bits": 8, "type": "float", "strategy": "tensor"}),
                        "kv_cache_scheme"),
    "packed": (_set("format", "pack-quantized"), "format='pack-quantized'"),
    # Maverick's scheme on more than the routed experts, or on some of them
    "shared-expert-quantized": (lambda q: q.__setitem__("ignore", [n for n in q["ignore"] if "shared_expert" not in n]),
                                "e.g. 'model.layers.1.feed_forward.shared_expert.gate_proj'"),
    "some-experts-ignored": (lambda q: q["ignore"].append("re:.*experts\\.1\\..*"),
                             "leaves 6 routed expert projection"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_other_quantization_configs_are_refused_by_name(case):
    edit, message = REFUSED[case]
    config = llama4_config()
    config.quantization_config = maverick(config, edit)
    with pytest.raises(UnsupportedConfigError, match=message):
        Llama4Config.from_hf(config)


def test_gemma4_refuses_every_quantization_config():
    config = Gemma4TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    config.quantization_config = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    with pytest.raises(UnsupportedConfigError, match="quant_method='compressed-tensors': Gemma 4 checkpoints"):
        Gemma4Config.from_hf(config)


# ---------------------------------------------------------------------------
# A tiny checkpoint in Maverick FP8's format.


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return fp8_checkpoints.build(cached_checkpoint("llama4", "tiny"), tmp_path_factory.mktemp("maverick-fp8"))


def test_fp8_checkpoint_keeps_experts_in_fp8_and_matches_hf_dequantized(fp8_checkpoint):
    fp8_dir, reference_dir = fp8_checkpoint
    model, mesh = load_model(JaxLlama4ForCausalLM, fp8_dir)
    experts = {".".join(map(str, path)): node[...] for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Param) and "experts" in path and "shared_expert" not in path}
    config = model.config
    assert config.fp8_experts is not None and config.moe_layers
    for i in config.moe_layers:
        for projection, (d_in, d_out) in {"gate_proj": (64, 64), "down_proj": (64, 64)}.items():
            values = experts[f"layers.{i}.feed_forward.experts.{projection}.array.qvalue"]
            scale = experts[f"layers.{i}.feed_forward.experts.{projection}.array.scale"]
            assert values.dtype == jnp.float8_e4m3fn and values.shape == (config.num_experts, d_in, d_out)
            assert scale.dtype == jnp.float32 and scale.shape == (config.num_experts, 1, d_out)
    # What the checkpoint stores, bit for bit: expert 1's down_proj of the first MoE layer.
    from safetensors.torch import load_file

    first = min(config.moe_layers)
    stored = load_file(fp8_dir / "model.safetensors")
    torch_weight = stored[f"model.layers.{first}.feed_forward.experts.1.down_proj.weight"]
    np.testing.assert_array_equal(
        np.asarray(experts[f"layers.{first}.feed_forward.experts.down_proj.array.qvalue"][1]).view(np.uint8),
        torch_weight.view(__import__("torch").uint8).numpy().T)

    engine = Engine(model, mesh)
    request = engine.add(SEQ)
    (logits,) = engine.step([(request, len(SEQ))])
    reference = hf_logits(reference_dir, SEQ)
    np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=0)
    # The FP8 rounding is real: the unquantized checkpoint's logits are further away than the tolerance.
    assert np.abs(logits - hf_logits(cached_checkpoint("llama4", "tiny"), SEQ)).max() > 10 * ATOL


# ---------------------------------------------------------------------------
# Qwix rules, through tpu-inference's model loading.


def build(path, additional_config=None, **engine_args):
    """Our model as tpu-inference's loader builds it (`get_flax_model`'s steps), Qwix included."""
    import jaxllm.vllm_plugin as plugin
    from tpu_inference.layers.jax.quantization import get_tpu_quantization_config
    from tpu_inference.models.common import model_loader
    from tpu_inference.utils import to_jax_dtype
    from vllm.engine.arg_utils import EngineArgs

    from jaxllm.vllm_plugin.host import plain_mesh

    plugin.register()
    vllm_config = EngineArgs(model=str(path), max_model_len=256, dtype=engine_args.pop("dtype", "float32"),
                             additional_config=additional_config or {}, **engine_args).create_engine_config()
    mesh = plain_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    vllm_config.model_config.dtype = to_jax_dtype(vllm_config.model_config.dtype)
    vllm_config.quant_config = get_tpu_quantization_config(vllm_config)
    model_loader.update_vllm_config_for_qwix_quantization(vllm_config)
    cls = model_loader._get_model_architecture(vllm_config.model_config.hf_config)
    with jax.set_mesh(mesh):
        return model_loader._get_nnx_model(cls, vllm_config, jax.random.key(0), mesh), mesh


def qwix(rules, **options):
    return {"quantization": {"qwix": {"rules": rules, **options}}}


def fake_quantized(unquantized, quantized):
    """`unquantized` with every weight that `quantized` holds quantized replaced by its dequantized value."""
    from qwix._src.core.qarray import dequantize
    from qwix._src.providers.ptq import WithAux

    model = nnx.clone(unquantized)
    modules = dict(nnx.iter_modules(quantized))
    replaced = 0
    for path, module in nnx.iter_modules(model):
        for name, node in vars(modules[path]).items():
            if isinstance(node, WithAux):
                target = getattr(module, name)
                target.set_value(dequantize(node.value.array).astype(target[...].dtype))
                replaced += 1
    return model, replaced


CASES = {
    "llama4": ("llama4", {}),
    "gemma4-moe": ("gemma4", dict(enable_moe_block=True, **GEMMA4_MOE["tiny"])),
}


@pytest.mark.parametrize("case", CASES)
def test_qwix_int8_equals_the_fake_quantized_model_experts_included(case):
    from jaxllm.model.quantization import quantized_weights

    arch, overrides = CASES[case]
    path = cached_checkpoint(arch, "tiny", **overrides)
    plain, mesh = build(path)
    quantized, _ = build(path, qwix(INT8))
    weights = quantized_weights(quantized)
    experts = {(module, name) for module, name in weights if module.endswith("experts")}
    assert len(experts) == 3 * sum(1 for _, m in nnx.iter_modules(quantized) if type(m).__name__ == "Experts")
    assert {node.dtype for path, node in nnx.iter_graph(quantized)
            if isinstance(node, nnx.Param) and path[-1] == "qvalue"} == {jnp.dtype(jnp.int8)}
    reference, replaced = fake_quantized(plain, quantized)
    assert replaced == len(weights)
    got, expected = logits_of(quantized, mesh), logits_of(reference, mesh)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - logits_of(plain, mesh)).max() > 1e-3  # quantization did change the weights


def logits_of(model, mesh):
    engine = Engine(model, mesh, cache_specs=_rows(model.config), kv_share=_shared(model.config))
    request = engine.add(SEQ)
    (logits,) = engine.step([(request, len(SEQ))])
    return logits


def _rows(config):
    if hasattr(config, "layers"):
        return [(layer.num_kv_heads, layer.head_dim) for layer in config.layers]
    return None


def _shared(config):
    if hasattr(config, "layers"):
        return {i: layer.kv_donor for i, layer in enumerate(config.layers) if layer.kv_donor is not None}
    return None


def test_qwix_with_dummy_weights_quantizes_the_random_model():
    from jaxllm.model.quantization import quantized_weights

    model, _ = build(cached_checkpoint("llama4", "tiny"), qwix(INT8), load_format="dummy")
    assert any(module.endswith("experts") for module, _ in quantized_weights(model))


RULE_ERRORS = {
    "matches-nothing": ([{"module_path": ".*attn", "weight_qtype": "int8"},
                         {"module_path": "layers/.*/mlp", "weight_qtype": "int8"}],
                        {}, r"rule #1 .* quantizes nothing in JaxLlama4ForCausalLM"),
    "shadowed": ([{"module_path": ".*", "weight_qtype": "int8"}, {"module_path": ".*attn", "weight_qtype": "int8"}],
                 {}, r"rule #1 .* an earlier rule takes them"),
    "no-weight-qtype": ([{"module_path": ".*", "act_qtype": "int8"}], {}, r"rule #0 .* has no weight_qtype"),
    "host-cannot-run": ([{"module_path": ".*", "weight_qtype": "int8", "act_qtype": "float4_e2m1fn"}], {},
                        r"act_qtype='float4_e2m1fn' can't run on this host's XLA backend \(cpu\)"),
    "abstract-model": (INT8, {"use_abstract_model": True}, "use_abstract_model"),
}


@pytest.mark.parametrize("case", RULE_ERRORS)
def test_qwix_rules_that_cannot_work_fail_at_start_up_naming_the_rule(case):
    from jaxllm.model.quantization import QwixRuleError

    rules, options, message = RULE_ERRORS[case]
    with pytest.raises(QwixRuleError, match=message):
        build(cached_checkpoint("llama4", "tiny"), qwix(rules, **options))


# ---------------------------------------------------------------------------
# The closeness bounds of tests/test_quantized_generate.py catch a wrong scale.


def next_token_logprobs(logits, tokens):
    """Logprob of each next token of `tokens` under `logits` [T, V] (position t predicts token t + 1)."""
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - lse[:-1]


def mean_delta(logits, reference, tokens=SEQ):
    return float(np.abs(next_token_logprobs(logits, tokens) - next_token_logprobs(reference, tokens)).mean())


def test_the_closeness_bounds_catch_a_wrong_scale(monkeypatch):
    """The engine tests bound mean |Δlogprob| against the bf16 run (Llama 4: 0.08 with an fp8 KV cache, 0.03 with
    int8 weights). The same measure here, in-process on the tiny Llama 4 in bf16 teacher-forced on 40 tokens:
    correct quantization stays within those bounds; K/V stored at twice their value (a scale applied on
    write but not on read), or int8 weights each dequantized with the next output channel's scale, go past
    them by far more than the bounds' margin."""
    from jaxllm.attention import dispatch
    from tpu_inference.layers.common.quantization import quantize_kv

    path = cached_checkpoint("llama4", "tiny")
    plain, mesh = build(path, dtype="bfloat16")

    def logits(model, cache_dtype=None):
        engine = Engine(model, mesh, cache_dtype=cache_dtype)
        request = engine.add(SEQ)
        return engine.step([(request, len(SEQ))])[0].astype(np.float32)

    reference = logits(plain)
    fp8_kv = mean_delta(logits(plain, jnp.float8_e4m3fn), reference)
    monkeypatch.setattr(dispatch, "quantize_kv", lambda dtype, k, v, k_scale, v_scale: quantize_kv(dtype, k, v, 0.5, 0.5))
    wrong_kv = mean_delta(logits(plain, jnp.float8_e4m3fn), reference)
    monkeypatch.undo()

    quantized, _ = build(path, qwix(INT8), dtype="bfloat16")
    int8 = mean_delta(logits(quantized), reference)
    from qwix._src.providers.ptq import WithAux

    wrong_axis = nnx.clone(quantized)
    for _, module in nnx.iter_modules(wrong_axis):
        for name, node in list(vars(module).items()):
            if isinstance(node, WithAux):
                scale = node.array.scale
                scale.set_value(jnp.roll(scale[...], 1, axis=-1))  # each output channel gets its neighbour's
    wrong_int8 = mean_delta(logits(wrong_axis), reference)
    print(f"\nmean |Δlogprob| vs bf16: fp8 KV {fp8_kv:.4f} (K/V x2: {wrong_kv:.4f}); "
          f"int8 {int8:.4f} (scales shifted: {wrong_int8:.4f})")
    assert fp8_kv <= 0.08 < 3 * 0.08 <= wrong_kv
    assert int8 <= 0.03 < 3 * 0.03 <= wrong_int8


def test_multimodal_fp8_checkpoint_gets_no_default_qwix_rules(tmp_path):
    """Maverick FP8 is a multimodal checkpoint (model_type llama4, compressed-tensors), for which tpu-inference
    adds Qwix rules of its own (qwix_utils.DEFAULT_LLAMA4_FP8_CONFIG, for its module names, on the abstract
    model). For ours the plugin adds none: the model loads with the checkpoint's FP8 experts and nothing
    quantized by Qwix."""
    import jaxllm.vllm_plugin as plugin
    from jaxllm.model.quantization import quantized_weights
    from tpu_inference.models.jax.utils.qwix import qwix_utils

    plugin.register()
    fp8_dir, _ = fp8_checkpoints.build(cached_checkpoint("llama4", "tiny", multimodal=True), tmp_path)
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["model_type"] == "llama4" and config["architectures"] == ["Llama4ForConditionalGeneration"]
    from types import SimpleNamespace

    hf_config = SimpleNamespace(model_type="llama4", quantization_config=config["quantization_config"],
                                architectures=config["architectures"])
    assert qwix_utils.get_default_qwix_quantization_config(hf_config, False) is not None  # what the builtin adds
    model, _ = build(fp8_dir)
    moe_layers = sorted(model.config.moe_layers)
    assert quantized_weights(model) == {(f"layers/{i}/feed_forward/experts", p)
                                        for i in moe_layers for p in ("gate_proj", "up_proj", "down_proj")}
