"""Tiny Llama 4 checkpoints in Llama 4 Maverick FP8's format, and their dequantized references.

Meta's Llama-4-Maverick-17B-128E-Instruct-FP8 is a compressed-tensors checkpoint
(`quant_method: compressed-tensors`, `format: float-quantized`, one config group on
`Linear` modules: FP8 weights with a static scale per output channel, inputs dynamic
per-token FP8) whose routed experts are stored one torch Linear per expert,
`...feed_forward.experts.{e}.{gate,up,down}_proj.weight` (float8_e4m3fn, [out, in]) with
`.weight_scale` ([out, 1]); everything else is listed in `ignore` and stays bf16.
Here compressed-tensors itself (`FloatQuantizationCompressor`, what llm-compressor writes
with) quantizes the tiny checkpoint's experts that way, with the FP8_DYNAMIC preset, and
decompresses them again for the reference, which transformers' fused Llama 4 loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from jaxllm.model.checkpoint_quantization import ModuleNames

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def _scheme():
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])


def quantization_config(ignore: list[str]) -> dict:
    """The `quantization_config` of Maverick FP8's config.json, with this model's ignore list."""
    scheme = _scheme()
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": scheme.weights.model_dump(mode="json"),
            "input_activations": scheme.input_activations.model_dump(mode="json"),
            "output_activations": None,
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def module_names(config: dict) -> ModuleNames:
    text = config.get("text_config", config)
    moe = [i for i in range(text["num_hidden_layers"]) if (i + 1) % text["interleave_moe_layer_step"] == 0] \
        if "moe_layers" not in text or text["moe_layers"] is None else text["moe_layers"]
    multimodal = "text_config" in config
    return ModuleNames(prefix="language_model.model." if multimodal else "model.",
                       lm_head="language_model.lm_head" if multimodal else "lm_head",
                       num_layers=text["num_hidden_layers"], moe_layers=frozenset(moe),
                       num_experts=text["num_local_experts"])


def _experts_per_linear(tensors: dict[str, torch.Tensor]):
    """(prefix, e, projection, torch Linear weight [out, in]) for each routed expert in the fused layout."""
    for name, w in tensors.items():
        if name.endswith("experts.gate_up_proj"):          # [E, D, 2F]: gate | up on the last axis
            base = name[:-len("gate_up_proj")]
            for e, fused in enumerate(w):
                gate, up = fused.T.chunk(2, dim=0)
                yield base, e, "gate_proj", gate
                yield base, e, "up_proj", up
        elif name.endswith("experts.down_proj"):           # [E, F, D]
            base = name[:-len("down_proj")]
            for e, down in enumerate(w):
                yield base, e, "down_proj", down.T


def build(source: Path, out: Path, *, ignore: list[str] | None = None, config_edit=None) -> tuple[Path, Path]:
    """(FP8 checkpoint, its dequantized reference) of the tiny Llama 4 at `source`, written under `out`.

    `ignore`: the ignore list (default: every non-expert Linear, by name, as Maverick FP8 names them).
    `config_edit(quantization_config)`: to write a variant of the format.
    """
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from safetensors.torch import load_file, save_file

    fp8_dir, reference_dir = out / "fp8", out / "dequantized"
    for folder in (fp8_dir, reference_dir):
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    names = module_names(config)
    experts = set(names.routed_experts())
    if ignore is None:
        ignore = [name for name in names.all() if name not in experts]
        if "vision_config" in config:  # the image encoder stays bf16 too
            ignore += ["re:vision_model.*", "re:multi_modal_projector.*"]
    tensors = load_file(source / "model.safetensors")
    scheme = _scheme()
    fp8, dequantized = {}, {}
    quantized = {}
    for base, e, projection, weight in _experts_per_linear(tensors):
        weight = weight.float().contiguous()
        scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX     # one per output channel
        stored = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
        fp8[f"{base}{e}.{projection}.weight"] = stored["weight"].contiguous()
        fp8[f"{base}{e}.{projection}.weight_scale"] = stored["weight_scale"].contiguous()
        quantized[(base, e, projection)] = FloatQuantizationCompressor.decompress(stored, scheme)["weight"]
    for name, w in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[:-len("gate_up_proj")]
            gate_up = [torch.cat([quantized[base, e, "gate_proj"], quantized[base, e, "up_proj"]]).T
                       for e in range(w.shape[0])]
            dequantized[name] = torch.stack(gate_up).to(w.dtype).contiguous()
        elif name.endswith("experts.down_proj"):
            base = name[:-len("down_proj")]
            dequantized[name] = torch.stack([quantized[base, e, "down_proj"].T for e in range(w.shape[0])]
                                            ).to(w.dtype).contiguous()
        else:
            dequantized[name] = fp8[name] = w
    save_file(fp8, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, reference_dir / "model.safetensors", metadata={"format": "pt"})
    quant = quantization_config(ignore)
    if config_edit is not None:
        config_edit(quant)
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2))
    return fp8_dir, reference_dir
