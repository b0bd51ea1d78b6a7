"""Image prompts through our models as tpu-inference's runner drives them, against Hugging Face.

For a prompt with one image and one with two, built by vLLM's own processor: the model's
`embed_multimodal` gets exactly the processor's outputs, `embed_input_ids` puts the features
at the positions vLLM marks, and the prefill step runs on those embeddings (with the token ids
beside them). Every token's logits are compared with HF's `...ForConditionalGeneration` on the
same images (fp32), at tensor parallel 1 and 2.

Tolerance 1e-4 on logits (as the text-only parity tests): the same math in another order
differs by ~1e-5; a feature at the wrong position, a dropped image or a wrong projector moves
the logits after the image by O(1).

"gemma4-bidi" is the tiny Gemma 4 with `use_bidirectional_attention="vision"` (as 31B and
26B-A4B): HF's processor returns `mm_token_type_ids`, and its sliding layers then let each
image's soft tokens attend to each other both ways (sliding window 8, images of 65-66 soft
tokens: a soft token sees the whole rest of its image ahead, but only 7 tokens back).
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
BIDI = dict(use_bidirectional_attention="vision")
FAMILIES = {"gemma4": ("gemma4", {}), "gemma4-bidi": ("gemma4", BIDI), "llama4": ("llama4", {})}


def checkpoint(name):
    arch, overrides = FAMILIES[name]
    return arch, cached_checkpoint(arch, "tiny", multimodal=True, **overrides)


_hf = {}


def hf_family(name):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name not in _hf:
        arch, path = checkpoint(name)
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        _hf[name] = arch, path, hf, AutoProcessor.from_pretrained(path), vllm_processor(path)
    return _hf[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return hf_family(request.param)


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
    if (path, tp) not in _models:
        _models[path, tp] = load_model(CLASSES[arch], path, mesh=auto_mesh(tp), max_model_len=512)
    return _models[path, tp]


def image_features(model, mesh, inputs) -> jax.Array:
    """[soft tokens, D]: the features of the images of `inputs`, in prompt order."""
    with jax.set_mesh(mesh):
        return jnp.concatenate(model.embed_multimodal(**inputs.kwargs))


def features_embed(model, flat, mask):
    """`embed(ids)` for a step, as the runner embeds it: the rows of `flat`, in order, at the positions
    where `mask` (the step's `is_multimodal`) is set."""
    def embed(token_ids):
        padded = jnp.zeros((token_ids.shape[0], flat.shape[1]), flat.dtype).at[:flat.shape[0]].set(flat)
        is_mm = jnp.zeros(token_ids.shape[0], bool).at[:len(mask)].set(jnp.asarray(mask))
        return model.embed_input_ids(token_ids, padded, is_multimodal=is_mm)
    return embed


@pytest.mark.parametrize("tp, num_images", [(1, 1), (2, 2), pytest.param(1, 2, marks=pytest.mark.slow),
                                            pytest.param(2, 1, marks=pytest.mark.slow)])
def test_image_prompt_logits_match_hf(family, tp, num_images):
    arch, path, hf, hf_processor, processor = family
    model, mesh = model_at(arch, path, tp)
    inputs = vllm_image_inputs(processor, images(num_images))
    ids, expected = hf_logits(hf, hf_processor, num_images)
    assert inputs.prompt_token_ids == ids  # vLLM's prompt is HF's, placeholders included
    with jax.set_mesh(mesh):
        features = model.embed_multimodal(**inputs.kwargs)
    assert [f.shape[0] for f in features] == [int(multimodal_mask(len(ids), [p]).sum()) for p in inputs.placeholders]

    engine = Engine(model, mesh, num_pages=96, pages_per_req=64)
    request = engine.add(ids)
    (logits,) = engine.step([(request, len(ids))], pad_to=len(ids) + 3,
                            embed=features_embed(model, image_features(model, mesh, inputs),
                                                 multimodal_mask(len(ids), inputs.placeholders)))
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


# ---------------------------------------------------------------------------
# Bidirectional vision attention (gemma4-bidi).


def test_bidirectional_checkpoint_is_not_causal():
    """The parity above can fail on gemma4-bidi: our model with the image runs left causal (what it did
    before) is O(1) away from HF."""
    import dataclasses

    arch, path, hf, hf_processor, processor = hf_family("gemma4-bidi")
    model, mesh = model_at(arch, path, 1)
    assert model.config.bidirectional_vision and model.needs_token_ids
    inputs = vllm_image_inputs(processor, images(1))
    ids, expected = hf_logits(hf, hf_processor, 1)
    mask = multimodal_mask(len(ids), inputs.placeholders)
    embed = features_embed(model, image_features(model, mesh, inputs), mask)
    bidirectional = model.config
    model.config = dataclasses.replace(bidirectional, bidirectional_vision=False)
    try:
        engine = Engine(model, mesh, num_pages=96, pages_per_req=64)
        (logits,) = engine.step([(engine.add(ids), len(ids))], embed=embed)
    finally:
        model.config = bidirectional
    assert np.abs(logits - expected).max() > 100 * ATOL


def test_bidirectional_runs_in_a_packed_batch_and_a_split_prefill():
    """Tensor parallel 2. Step 1: a 2-image prompt whole, packed after the first part of a 1-image prompt
    that stops right before its image; step 2: the rest of that prompt, its image attending to the text
    of step 1 in the cache. Every token's logits are HF's (each prompt alone) within 1e-4."""
    arch, path, hf, hf_processor, processor = hf_family("gemma4-bidi")
    model, mesh = model_at(arch, path, 2)
    prompts = {n: (vllm_image_inputs(processor, images(n)), *hf_logits(hf, hf_processor, n)) for n in (1, 2)}
    (one, one_ids, one_expected), (two, two_ids, two_expected) = prompts[1], prompts[2]
    one_mask = multimodal_mask(len(one_ids), one.placeholders)
    two_mask = multimodal_mask(len(two_ids), two.placeholders)
    split = int(np.argmax(one_mask))  # right before the image's first soft token
    one_features, two_features = image_features(model, mesh, one), image_features(model, mesh, two)

    engine = Engine(model, mesh, num_pages=160, pages_per_req=64)
    first, second = engine.add(one_ids), engine.add(two_ids)
    logits_a, logits_b = engine.step([(first, split), (second, len(two_ids))], pad_to=split + len(two_ids) + 5,
                                     embed=features_embed(model, two_features,
                                                          np.concatenate([one_mask[:split], two_mask])))
    (logits_c,) = engine.step([(first, len(one_ids) - split)],
                              embed=features_embed(model, one_features, one_mask[split:]))
    np.testing.assert_allclose(logits_b, two_expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.concatenate([logits_a, logits_c]), one_expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gemma4", "gemma4-bidi"])
def test_an_image_split_across_steps(name):
    """Why the plugin keeps an image in one step (`disable_chunked_mm_input`): prefilled in two steps
    split inside its image, the first part of a bidirectional image is computed without the rest, and
    the logits from there on leave HF's by O(1); the causal model's are HF's."""
    arch, path, hf, hf_processor, processor = hf_family(name)
    model, mesh = model_at(arch, path, 1)
    inputs = vllm_image_inputs(processor, images(1))
    ids, expected = hf_logits(hf, hf_processor, 1)
    mask = multimodal_mask(len(ids), inputs.placeholders)
    split = int(np.argmax(mask)) + int(mask.sum()) // 2  # the middle of the image
    features = image_features(model, mesh, inputs)
    engine = Engine(model, mesh, num_pages=96, pages_per_req=64)
    request = engine.add(ids)
    done = int(mask[:split].sum())  # soft tokens in the first step
    (first,) = engine.step([(request, split)], embed=features_embed(model, features[:done], mask[:split]))
    (rest,) = engine.step([(request, len(ids) - split)], embed=features_embed(model, features[done:], mask[split:]))
    logits = np.concatenate([first, rest])
    if model.config.bidirectional_vision:
        assert np.abs(logits - expected).max() > 100 * ATOL
    else:
        np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


def test_the_plugin_keeps_bidirectional_images_whole():
    """The plugin's config hook sets `disable_chunked_mm_input` for Gemma 4 with bidirectional vision
    that takes images, and for no other (the plain tiny Gemma 4, or image input off); a text-only
    config with "vision" has no soft tokens and stays causal."""
    from transformers import Gemma4TextConfig
    from vllm.config import ModelConfig, VllmConfig

    from jaxllm.model.config import Gemma4Config
    from jaxllm.vllm_plugin.multimodal import keep_images_whole

    def whole(name, **kw):
        config = VllmConfig(model_config=ModelConfig(model=str(checkpoint(name)[1]), dtype="float32",
                                                     max_model_len=256, **kw))
        config.scheduler_config.disable_chunked_mm_input = False
        keep_images_whole(config)
        return config.scheduler_config.disable_chunked_mm_input

    assert whole("gemma4-bidi")
    assert not whole("gemma4")
    assert not whole("gemma4-bidi", limit_mm_per_prompt={"image": 0, "video": 0, "audio": 0})
    assert not Gemma4Config.from_hf(Gemma4TextConfig(use_bidirectional_attention="vision")).bidirectional_vision


def test_refusing_audio_and_video_leaves_images_on():
    """tpu-inference's runner serves a model text-only when every limit *listed* is 0: with audio and
    video set to 0, the image limit must be listed too (999, vLLM's default), or images never reach
    the model (vLLM would serve image prompts as if the image were pad tokens)."""
    from vllm.config import ModelConfig, VllmConfig

    from jaxllm.vllm_plugin.multimodal import refuse_unserved_modalities

    config = VllmConfig(model_config=ModelConfig(model=str(checkpoint("gemma4")[1]), dtype="float32",
                                                 max_model_len=256))
    refuse_unserved_modalities(config)
    limits = config.model_config.multimodal_config.limit_per_prompt
    assert limits["audio"].count == limits["video"].count == 0 and limits["image"].count == 999
    assert not all(limit.count == 0 for limit in limits.values())  # tpu_runner.py's disable_mm_from_limits
