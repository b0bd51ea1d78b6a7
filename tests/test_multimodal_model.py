"""Image prompts through our models as tpu-inference's runner drives them, against Hugging Face.

For a prompt with one image and one with two, built by vLLM's own processor: the model's
`embed_multimodal` gets exactly the processor's outputs, `embed_input_ids` puts the features
at the positions vLLM marks, and the prefill step runs on those embeddings (with the token ids
beside them). Every token's logits are compared with HF's `...ForConditionalGeneration` on the
same images (fp32), at tensor parallel 1 and 2.

Tolerance 1e-4 on logits (as the text-only parity tests): the same math in another order
differs by ~1e-5; a feature at the wrong position, a dropped image or a wrong projector moves
the logits after the image by O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from harness import Engine, auto_mesh, load_model
from jaxllm.checkpoints import cached_checkpoint
from jaxllm.model.gemma4 import JaxGemma4ForConditionalGeneration
from jaxllm.model.llama4 import JaxLlama4ForConditionalGeneration
from multimodal_inputs import chat, images, vllm_image_inputs, vllm_processor

ATOL = 1e-4
CLASSES = {"gemma4": JaxGemma4ForConditionalGeneration, "llama4": JaxLlama4ForConditionalGeneration}


@pytest.fixture(scope="module", params=list(CLASSES))
def family(request):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = cached_checkpoint(request.param, "tiny", multimodal=True)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf, AutoProcessor.from_pretrained(path), vllm_processor(path)


def hf_logits(hf, processor, num_images) -> tuple[list[int], np.ndarray]:
    inputs = processor.apply_chat_template(chat(num_images, pictures=images(num_images)), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float32)  # Llama 4's processor makes bf16
    with torch.no_grad():
        return inputs["input_ids"][0].tolist(), hf(**inputs).logits[0].numpy()


def multimodal_mask(num_tokens: int, placeholders) -> np.ndarray:
    """The runner's `is_multimodal`: the positions vLLM fills with image features."""
    mask = np.zeros(num_tokens, bool)
    for p in placeholders:
        embeds = np.ones(p.length, bool) if p.is_embed is None else np.asarray(p.is_embed)
        mask[p.offset:p.offset + p.length] = embeds
    return mask


_models = {}


def model_at(arch, path, tp):
    if (arch, tp) not in _models:
        _models[arch, tp] = load_model(CLASSES[arch], path, mesh=auto_mesh(tp), max_model_len=512)
    return _models[arch, tp]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("num_images", [1, 2])
def test_image_prompt_logits_match_hf(family, tp, num_images):
    arch, path, hf, hf_processor, processor = family
    model, mesh = model_at(arch, path, tp)
    inputs = vllm_image_inputs(processor, images(num_images))
    ids, expected = hf_logits(hf, hf_processor, num_images)
    assert inputs.prompt_token_ids == ids  # vLLM's prompt is HF's, placeholders included
    with jax.set_mesh(mesh):
        features = model.embed_multimodal(**inputs.kwargs)
    mask = multimodal_mask(len(ids), inputs.placeholders)
    assert [f.shape[0] for f in features] == [int(multimodal_mask(len(ids), [p]).sum()) for p in inputs.placeholders]
    flat = jnp.concatenate(features)

    def embed(token_ids):  # as the runner does: features padded to the step's tokens, with its mask
        padded = jnp.zeros((token_ids.shape[0], flat.shape[1]), flat.dtype).at[:flat.shape[0]].set(flat)
        is_mm = jnp.zeros(token_ids.shape[0], bool).at[:len(mask)].set(jnp.asarray(mask))
        return model.embed_input_ids(token_ids, padded, is_multimodal=is_mm)

    engine = Engine(model, mesh, num_pages=96, pages_per_req=64)
    request = engine.add(ids)
    (logits,) = engine.step([(request, len(ids))], pad_to=len(ids) + 3, embed=embed)
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


def test_without_features_the_logits_differ(family):
    """The check above can fail: with the image positions left as text embeddings, logits move."""
    arch, path, hf, hf_processor, processor = family
    model, mesh = model_at(arch, path, 1)
    ids, expected = hf_logits(hf, hf_processor, 1)
    engine = Engine(model, mesh, num_pages=96, pages_per_req=64)
    (logits,) = engine.step([(engine.add(ids), len(ids))], embed=model.embed_input_ids)
    assert np.abs(logits - expected).max() > 100 * ATOL


def test_image_limit_zero_builds_no_encoder_and_skips_its_weights():
    from vllm.config import ModelConfig, VllmConfig
    from flax import nnx

    path = cached_checkpoint("gemma4", "tiny", multimodal=True)
    config = VllmConfig(model_config=ModelConfig(model=str(path), dtype="float32", max_model_len=256,
                                                 limit_mm_per_prompt={"image": 0, "video": 0, "audio": 0}))
    mesh = auto_mesh()
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: JaxGemma4ForConditionalGeneration(config, jax.random.key(0), mesh))
        model.load_weights(jax.random.key(0))
    assert model.vision is None
    with pytest.raises(ValueError, match="without image input"):
        model.embed_multimodal(pixel_values=np.zeros((1, 4, 4)))
