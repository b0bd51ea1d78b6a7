"""Image prompts as vLLM's own multimodal processor hands them to a model, built without an engine.

vLLM processes a prompt with `MULTIMODAL_REGISTRY.create_processor(model_config)` (the
processor class registered for the checkpoint's architecture), caches one `MultiModalKwargsItem`
per image, and the runner batches a step's items with `group_and_batch_mm_kwargs` into the
keyword arguments of `embed_multimodal(**kwargs)`. `vllm_image_inputs` does the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (height, width) of the test images: one wide, one tall, neither a multiple of any tile or
# patch size, so both processors resize, pad and (Llama 4) tile them.
IMAGE_SIZES = ((40, 70), (130, 50))


def images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*IMAGE_SIZES[i], 3), dtype=np.uint8)) for i in range(n)]


def chat(num_images: int, text: str = "Describe the image.", pictures=None) -> list[dict]:
    """One user turn: `num_images` image parts (with the PIL images, if given), then text."""
    parts = [{"type": "image"} if pictures is None else {"type": "image", "image": pictures[i]}
             for i in range(num_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def model_config(path, dtype: str = "float32"):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), dtype=dtype, max_model_len=2048)


def vllm_processor(path, dtype: str = "float32"):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(model_config(path, dtype))


@dataclasses.dataclass
class VllmImageInputs:
    prompt_token_ids: list[int]
    placeholders: list          # vLLM's PlaceholderRange per image, in prompt order
    kwargs: dict                # what embed_multimodal(**kwargs) receives for these images (torch tensors)


def vllm_image_inputs(processor, pictures) -> VllmImageInputs:
    """Process a chat with `pictures` as vLLM does, and batch the items as tpu-inference's runner does."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    tokenizer = processor.info.get_tokenizer()
    prompt = tokenizer.apply_chat_template(chat(len(pictures)), add_generation_prompt=True, tokenize=False)
    # As vLLM's chat endpoint tokenizes a rendered template: the template has the special tokens.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = processor(ids, processor.info.parse_mm_data({"image": list(pictures)}), hf_processor_mm_kwargs={})
    items = [("image", item) for item in out["mm_kwargs"]["image"]]
    batches = list(group_and_batch_mm_kwargs(items))
    assert len(batches) == 1, batches  # one modality, same fields: one batch
    (modality, num_items, kwargs), = batches
    assert (modality, num_items) == ("image", len(pictures))
    return VllmImageInputs(out["prompt_token_ids"], list(out["mm_placeholders"]["image"]), dict(kwargs))
