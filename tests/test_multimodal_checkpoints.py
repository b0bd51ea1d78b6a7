"""Multimodal test checkpoints carry what a released one has: processor, image processor, chat
template and a tokenizer with the image tokens, consistent with the tiny vision tower.

Checked through transformers (AutoProcessor, then `generate` on the processed chat) and through
vLLM's own multimodal processor for the architecture (built from a ModelConfig, no engine), with
prompts of one and two images. The image placeholders vLLM inserts must be exactly as many as
HF's processor inserts for the same images, since both feed the same vision features.
"""

import json

import numpy as np
import pytest
import torch

from jaxllm.checkpoints import GEMMA4_SOFT_TOKENS, LLAMA4_MAX_TILES, cached_checkpoint
from multimodal_inputs import chat, images, vllm_image_inputs, vllm_processor

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                   "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module", params=["gemma4", "llama4"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def path(arch):
    return cached_checkpoint(arch, "tiny", multimodal=True)


@pytest.fixture(scope="module")
def processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def hf_chat_inputs(processor, num_images):
    return processor.apply_chat_template(chat(num_images, pictures=images(num_images)), add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")


def image_token_counts(arch, config, processor, inputs) -> list[int]:
    """Per image, how many prompt tokens HF's processor reserved for its features: Gemma 4's
    `<|image|>` between `<|image>` and `<image|>`; Llama 4's `<|patch|>` tokens of all tiles
    (split by tile separators) up to `<|image_end|>`."""
    ids = inputs["input_ids"][0].tolist()
    token, end = ((config.image_token_id, config.eoi_token_id) if arch == "gemma4"
                  else (config.image_token_index, config.eoi_token_index))
    counts, current = [], 0
    for t in ids:
        if t == token:
            current += 1
        elif t == end:
            counts.append(current)
            current = 0
    assert current == 0, "image tokens after the last end-of-image token"
    return counts


def test_released_files_are_written(path):
    names = {p.name for p in path.iterdir()}
    assert set(PROCESSOR_FILES) <= names, sorted(names)
    assert json.loads((path / "config.json").read_text())["architectures"][0].endswith("ForConditionalGeneration")


def test_text_only_checkpoints_have_no_processor(arch):
    path = cached_checkpoint(arch, "tiny")
    assert not (path / "processor_config.json").exists()
    assert not (path / "preprocessor_config.json").exists()


def test_config_token_ids_are_the_tokenizers(arch, path, processor):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    ids = processor.tokenizer.convert_tokens_to_ids
    if arch == "gemma4":
        assert type(processor).__name__ == "Gemma4Processor"
        expected = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                    "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
                    "audio_token_id": "<|audio|>"}
        assert processor.image_token_id == config.image_token_id
        assert processor.video_token_id == config.video_token_id
        assert (processor.tokenizer.boa_token, processor.tokenizer.eoa_token) == ("<|audio>", "<audio|>")
    else:
        assert type(processor).__name__ == "Llama4Processor"
        expected = {"boi_token_index": "<|image_start|>", "eoi_token_index": "<|image_end|>",
                    "image_token_index": "<|patch|>"}
        assert processor.image_token_id == ids("<|image|>")
    for field, token in expected.items():
        assert getattr(config, field) == ids(token), field
    tokens = list(expected.values())
    if arch == "llama4":
        tokens += ["<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    for token in tokens:
        # One token each, never split by the BPE, in text as the processors write it.
        assert processor.tokenizer.encode(f"a{token}b", add_special_tokens=False)[1:-1] == [ids(token)], token


def test_processor_settings_match_the_vision_tower(arch, path, processor):
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(path).vision_config
    image_processor = processor.image_processor
    if arch == "gemma4":
        assert vision.default_output_length == image_processor.max_soft_tokens == GEMMA4_SOFT_TOKENS
        assert (image_processor.patch_size, image_processor.pooling_kernel_size) == \
            (vision.patch_size, vision.pooling_kernel_size)
        assert (processor.video_processor.patch_size, processor.video_processor.pooling_kernel_size) == \
            (vision.patch_size, vision.pooling_kernel_size)
        # The widest image (a strip 3 patches high) must stay inside the position tables.
        assert GEMMA4_SOFT_TOKENS * vision.pooling_kernel_size <= vision.position_embedding_size
    else:
        assert image_processor.size.height == image_processor.size.width == vision.image_size
        assert image_processor.max_patches == LLAMA4_MAX_TILES
        assert processor.patch_size == vision.patch_size
        assert processor.downsample_ratio == round(vision.pixel_shuffle_ratio ** -2)


@pytest.mark.parametrize("num_images", [1, 2])
def test_hf_processes_a_chat_with_images_and_generates(arch, path, processor, num_images):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    inputs = hf_chat_inputs(processor, num_images)
    counts = image_token_counts(arch, config, processor, inputs)
    assert len(counts) == num_images and min(counts) > 0, counts
    if arch == "gemma4":
        assert tuple(inputs["pixel_values"].shape) == (num_images, GEMMA4_SOFT_TOKENS * 9, 3 * 16 * 16)
        assert tuple(inputs["image_position_ids"].shape) == (num_images, GEMMA4_SOFT_TOKENS * 9, 2)
        assert all(n <= GEMMA4_SOFT_TOKENS for n in counts)
    else:
        tiles, channels, height, width = inputs["pixel_values"].shape
        assert (channels, height, width) == (3, 56, 56)
        # 4 <|patch|> tokens per tile (4 x 4 patches, pixel-shuffled by 0.5), global tile included.
        assert sum(counts) == 4 * tiles
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # Llama 4's image processor normalises in bf16 (as the released one does); an fp32 model
    # needs its pixels in fp32 (vLLM casts them to the model dtype the same way).
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float32)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


@pytest.fixture(scope="module")
def vllm_proc(path):
    return vllm_processor(path)


@pytest.mark.parametrize("num_images", [1, 2])
def test_vllm_processes_prompts_with_images(arch, path, processor, vllm_proc, num_images):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    expected_class = {"gemma4": "Gemma4MultiModalProcessor", "llama4": "Mllama4MultiModalProcessor"}[arch]
    assert type(vllm_proc).__name__ == expected_class
    mm = vllm_image_inputs(vllm_proc, images(num_images))
    hf = hf_chat_inputs(processor, num_images)
    # The features each image gets in the prompt: the placeholder tokens vLLM embeds, as many as HF's.
    embedded = [int(r.is_embed.sum()) if r.is_embed is not None else r.length for r in mm.placeholders]
    assert embedded == image_token_counts(arch, config, processor, hf)
    ids = np.asarray(mm.prompt_token_ids)
    image_token = config.image_token_id if arch == "gemma4" else config.image_token_index
    for r in mm.placeholders:
        span = ids[r.offset:r.offset + r.length]
        assert (span[r.is_embed.numpy()] == image_token).all()
    assert (ids == image_token).sum() == sum(embedded)
    kw = mm.kwargs
    if arch == "gemma4":
        assert set(kw) == {"pixel_values", "pixel_position_ids"}
        np.testing.assert_array_equal(kw["pixel_values"].numpy(), hf["pixel_values"].numpy())
        np.testing.assert_array_equal(kw["pixel_position_ids"].numpy(), hf["image_position_ids"].numpy())
    else:
        assert set(kw) == {"pixel_values", "patches_per_image", "aspect_ratios"}
        assert kw["pixel_values"].dtype == torch.float32  # cast to the model dtype
        np.testing.assert_array_equal(kw["pixel_values"].numpy(), hf["pixel_values"].float().numpy())
        assert kw["patches_per_image"].sum() == kw["pixel_values"].shape[0]
        assert tuple(kw["aspect_ratios"].shape) == (num_images, 2)
