"""The image encoders against Hugging Face transformers, on the inputs vLLM's processor produces.

For prompts with one and two images, the encoder gets exactly the keyword arguments vLLM's
multimodal processor hands `embed_multimodal` (built from a ModelConfig, batched as the runner
does), and its per-image features (after the projector) are compared with HF's for the same
images: Gemma 4's `get_image_features(...).pooler_output`, Llama 4's `multi_modal_projector` of
`get_image_features(...)`, both fp32, at tensor parallel 1 and 2.

Tolerance: 1e-4 absolute. Features are O(0.3) (Gemma 4) and O(1) (Llama 4); the same math in
another summation order differs by ~1e-6 (observed <= 1.1e-6). The mistakes tried while writing
the encoders move them by 80x the tolerance or more: Gemma 4 without its 2-D RoPE 8e-3, with x and
y swapped 1.6e-2, a norm weight dropped 2.4e-2; Llama 4 without RoPE 3.4e-2, a q bias dropped
9e-3, pixel shuffle transposed 1.1.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from harness import auto_mesh, vllm_config
from jaxllm.checkpoints import cached_checkpoint
from jaxllm.model.config import UnsupportedConfigError
from jaxllm.model.vision.gemma4 import Gemma4ImageEncoder, Gemma4VisionConfig
from jaxllm.model.vision.llama4 import Llama4ImageEncoder, Llama4VisionConfig
from jaxllm.model.weights import checkpoint_tensors, load_checkpoint
from multimodal_inputs import chat, images, vllm_image_inputs, vllm_processor

ATOL = 1e-4


def load_encoder(cls, config_cls, path, mesh, dtype=jnp.float32):
    """Build abstractly and load the vision tensors, as tpu-inference's loader does for a model."""
    from transformers import AutoConfig

    config = config_cls.from_hf(AutoConfig.from_pretrained(path))
    with jax.set_mesh(mesh):
        encoder = nnx.eval_shape(lambda: cls(config, dtype, mesh, nnx.Rngs(0)))
        load_checkpoint(encoder, checkpoint_tensors(vllm_config(path)), encoder.checkpoint_rules(), mesh=mesh,
                        dtype=dtype, checkpoint=str(path), strip_prefixes=encoder.checkpoint_prefixes,
                        skip_prefixes=encoder.skipped_prefixes)
    return encoder


def hf_inputs(processor, num_images):
    inputs = processor.apply_chat_template(chat(num_images, pictures=images(num_images)), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    # Llama 4's processor normalises in bf16; the fp32 model takes them as fp32 (vLLM casts them too).
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float32)
    return inputs


def gemma4_hf_features(model, processor, inputs, pictures) -> list[np.ndarray]:
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    return [f.numpy() for f in out.pooler_output]


def llama4_hf_features(model, processor, inputs, pictures) -> list[np.ndarray]:
    # Per tile; HF's forward flattens all tiles, projects them and fills the <|patch|> tokens in that order.
    tiles = model.get_image_features(inputs["pixel_values"]).last_hidden_state
    projected = model.multi_modal_projector(tiles).numpy()
    # The processor's chat output leaves out how each image was tiled; its image processor says.
    ratios = processor.image_processor(pictures, return_tensors="pt")["aspect_ratios"].tolist()
    counts = [ratio_h * ratio_w + (ratio_h * ratio_w > 1) for ratio_h, ratio_w in ratios]
    starts = np.cumsum([0] + counts)
    return [projected[a:b].reshape(-1, projected.shape[-1]) for a, b in zip(starts[:-1], starts[1:])]


@dataclasses.dataclass
class Family:
    arch: str
    encoder: type
    config: type
    hf_features: object
    image_token_field: str


FAMILIES = {
    "gemma4": Family("gemma4", Gemma4ImageEncoder, Gemma4VisionConfig, gemma4_hf_features, "image_token_id"),
    "llama4": Family("llama4", Llama4ImageEncoder, Llama4VisionConfig, llama4_hf_features, "image_token_index"),
}


@dataclasses.dataclass
class Reference:
    family: Family
    path: object
    hf_config: object
    model: object
    processor: object
    vllm: object


@pytest.fixture(scope="module", params=list(FAMILIES))
def ref(request):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    family = FAMILIES[request.param]
    path = cached_checkpoint(family.arch, "tiny", multimodal=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return Reference(family, path, AutoConfig.from_pretrained(path), model, AutoProcessor.from_pretrained(path),
                     vllm_processor(path))


_encoders = {}


def encoder_at(ref, tp):
    key = (ref.family.arch, tp)
    if key not in _encoders:
        _encoders[key] = (load_encoder(ref.family.encoder, ref.family.config, ref.path, auto_mesh(tp)), auto_mesh(tp))
    return _encoders[key]


def reference_features(ref, num_images):
    inputs = hf_inputs(ref.processor, num_images)
    with torch.no_grad():
        return ref.family.hf_features(ref.model, ref.processor, inputs, images(num_images)), inputs


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("num_images", [1, 2])
def test_features_match_hf_on_vllm_inputs(ref, tp, num_images):
    assert len(jax.devices()) >= tp
    encoder, mesh = encoder_at(ref, tp)
    mm = vllm_image_inputs(ref.vllm, images(num_images))
    with jax.set_mesh(mesh):
        features = encoder.encode_images(**mm.kwargs)
    expected, _ = reference_features(ref, num_images)
    assert len(features) == num_images
    for i, (ours, theirs, placeholder) in enumerate(zip(features, expected, mm.placeholders)):
        # One row per placeholder vLLM fills with this image's features.
        assert ours.shape == (int(placeholder.is_embed.sum()), ref.hf_config.text_config.hidden_size)
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL, rtol=0, err_msg=f"image {i}")


def test_tensor_parallel_shards_heads_and_mlp(ref):
    encoder, _ = encoder_at(ref, 2)
    layer = encoder.layers[0]
    q = layer.attn.q_proj.weight if ref.family.arch == "gemma4" else layer.attn.q_proj
    fc = layer.mlp.gate_proj.weight if ref.family.arch == "gemma4" else layer.mlp.fc1
    for weight, axis in ((q, 1), (fc, 1)):
        shard = weight[...].addressable_shards[0].data.shape
        assert shard[axis] == weight.shape[axis] // 2, (weight.shape, shard)


def test_features_fill_the_image_tokens_of_hf_forward(ref):
    """HF's logits for a two-image prompt are reproduced with our features in its inputs_embeds."""
    encoder, mesh = encoder_at(ref, 1)
    mm = vllm_image_inputs(ref.vllm, images(2))
    with jax.set_mesh(mesh):
        features = np.concatenate([np.asarray(f) for f in encoder.encode_images(**mm.kwargs)])
    inputs = hf_inputs(ref.processor, 2)
    ids = inputs["input_ids"]
    image_token = getattr(ref.hf_config, ref.family.image_token_field)
    with torch.no_grad():
        expected = ref.model(**inputs).logits
        text_ids = ids.clone()
        if ref.family.arch == "gemma4":
            text_ids[ids == image_token] = ref.hf_config.text_config.pad_token_id  # as HF embeds placeholders
        embeds = ref.model.get_input_embeddings()(text_ids)
        embeds[ids == image_token] = torch.from_numpy(features)
        ours = ref.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    assert (ids == image_token).sum() == features.shape[0]
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=ATOL, rtol=0)


def test_gemma4_clipped_linears(tmp_path):
    """`use_clipped_linears`: each encoder projection clamps its input and output to stored bounds."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = cached_checkpoint("gemma4", "tiny", multimodal=True)
    clipped = tmp_path / "clipped"
    shutil.copytree(path, clipped)
    config = json.loads((clipped / "config.json").read_text())
    config["vision_config"]["use_clipped_linears"] = True
    (clipped / "config.json").write_text(json.dumps(config))
    tensors = load_file(clipped / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.startswith("model.vision_tower.encoder.") and n.endswith(".linear.weight")]:
        base = name[:-len(".linear.weight")]
        # Bounds that bite: inputs are O(1) (normed), outputs O(0.1).
        for bound, value in (("input_min", -0.8), ("input_max", 0.8), ("output_min", -0.08), ("output_max", 0.08)):
            tensors[f"{base}.{bound}"] = torch.tensor(value * (1 + 0.2 * rng.random()), dtype=torch.float32)
    save_file(tensors, clipped / "model.safetensors", metadata={"format": "pt"})

    inputs = hf_inputs(AutoProcessor.from_pretrained(clipped), 1)
    with torch.no_grad():
        (expected,) = gemma4_hf_features(AutoModelForImageTextToText.from_pretrained(clipped, dtype=torch.float32),
                                         None, inputs, None)
        (unclipped,) = gemma4_hf_features(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32),
                                          None, inputs, None)
    assert np.abs(expected - unclipped).max() > 100 * ATOL  # the bounds matter
    encoder = load_encoder(Gemma4ImageEncoder, Gemma4VisionConfig, clipped, auto_mesh(1))
    with jax.set_mesh(auto_mesh(1)):
        (ours,) = encoder.encode_images(inputs["pixel_values"], inputs["image_position_ids"])
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch, field, value, named", [
    ("gemma4", "attention_bias", True, "attention_bias"),
    ("gemma4", "rope_parameters", {"rope_type": "default", "rope_theta": 100.0}, "rope_type='default'"),
    ("gemma4", "pooling_kernel_size", 1, "pooling_kernel_size"),
    ("llama4", "pixel_shuffle_ratio", 0.25, "intermediate_size"),
    ("llama4", "projector_output_dim", 32, "projector_output_dim"),
    ("llama4", "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_type='linear'"),
])
def test_unsupported_vision_config_is_refused_by_name(arch, field, value, named):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cached_checkpoint(arch, "tiny", multimodal=True))
    setattr(config.vision_config, field, value)
    with pytest.raises(UnsupportedConfigError, match=named):
        FAMILIES[arch].config.from_hf(config)


def test_text_only_config_has_no_vision_model():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cached_checkpoint("gemma4", "tiny"))
    with pytest.raises(UnsupportedConfigError, match="vision_config"):
        Gemma4VisionConfig.from_hf(config)
