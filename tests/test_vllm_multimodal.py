"""Released-style multimodal checkpoints through vllm.LLM: started as users start them, images in.

The tiny `...ForConditionalGeneration` checkpoints carry what a released one has
(processor files, the image tokens). Each engine starts with no multimodal flag at
all, and serves a text prompt, a prompt with one image and one with two (and, for
Gemma 4, is asked for a video it does not serve). Greedy tokens must equal Hugging
Face's `generate` on the same chat and images (fp32), and each token's logprob
HF's within 1e-4, as in test_vllm_generate.py.

The first engine runs tpu-inference's warm-up (`SKIP_JAX_PRECOMPILE=0`), the path
users run: it compiles the multimodal steps (`embed_input_ids`, the backbone on
embeddings, our image encoder) before any request. The others skip it to save time.

"gemma4-bidi" serves the tiny Gemma 4 with `use_bidirectional_attention="vision"`
(each image's soft tokens attend to each other on sliding layers, as 31B / 26B-A4B),
with steps of at most 80 tokens: the prompts (90 and 157 tokens) are prefilled in
several steps, and the plugin must keep each image (66 soft tokens) whole in one. The
1-image prompt is then asked again and served from the prefix cache (64 of its 90
tokens, a hit that ends inside the image: the rest of it comes in one step).

The engine core is spawned, not forked: the Hugging Face reference runs torch in this
process between engines, and a forked child inherits torch's thread pool in a state
where its first multithreaded op (batching the images' tensors) never returns.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from jaxllm.checkpoints import cached_checkpoint
from multimodal_inputs import chat, images

MAX_TOKENS = 12
LOGPROB_ATOL = 1e-4

CASES = {
    # name: (arch, engine args, run tpu-inference's warm-up, checkpoint overrides)
    "gemma4-warmup": ("gemma4", {}, True, {}),
    "gemma4-tp2": ("gemma4", {"tensor_parallel_size": 2}, False, {}),
    "gemma4-bidi": ("gemma4", {"max_num_batched_tokens": 80}, False, {"use_bidirectional_attention": "vision"}),
    "llama4": ("llama4", {}, False, {}),
    "llama4-tp2": ("llama4", {"tensor_parallel_size": 2}, False, {}),
}


def conversations():
    """A text prompt, and prompts with one and two images."""
    return [chat(n, "Describe the image." if n else "Tell me a story about a robot.", pictures=images(n, seed=n))
            for n in (0, 1, 2)]


def vllm_prompt(tokenizer, messages) -> dict:
    """As vLLM's chat endpoint does: the rendered template (which holds the special tokens), tokenized."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    pictures = [part["image"] for part in messages[0]["content"] if part["type"] == "image"]
    if pictures:
        prompt["multi_modal_data"] = {"image": pictures}
    return prompt


def hf_greedy(path, conversations_):
    """HF's greedy tokens and logprobs. Run after the engine: torch's thread pool must not exist
    when vLLM forks its engine core (a forked child then hangs in its first torch op)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    results = []
    for messages in conversations_:
        inputs = dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt"))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.float32)  # Llama 4's processor makes bf16
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(out.logits, tokens)]
        results.append((inputs["input_ids"][0].tolist(), tokens, logprobs))
    return results


@pytest.mark.parametrize("case", CASES)
def test_multimodal_checkpoint_starts_and_matches_hf(case, monkeypatch):
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    arch, engine_args, warm_up, overrides = CASES[case]
    monkeypatch.setenv("SKIP_JAX_PRECOMPILE", "0" if warm_up else "1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from transformers import AutoTokenizer

    path = cached_checkpoint(arch, "tiny", multimodal=True, **overrides)
    chats = conversations()
    prompts = [vllm_prompt(AutoTokenizer.from_pretrained(path), messages) for messages in chats]
    llm = LLM(model=str(path), max_model_len=512, max_num_seqs=4, dtype="float32", seed=0,
              num_gpu_blocks_override=96, **engine_args)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
        outputs = llm.generate(prompts, params)
        if overrides:  # gemma4-bidi
            assert llm.llm_engine.vllm_config.scheduler_config.disable_chunked_mm_input
            chats.append(chats[1])  # the 1-image prompt again: its image from the prefix cache
            outputs += llm.generate(prompts[1], params)
            assert outputs[-1].num_cached_tokens >= len(outputs[-1].prompt_token_ids) // 2
        elif arch == "gemma4":  # vLLM's processor takes video for Gemma 4; ours refuses it, per request
            frames = np.zeros((2, 32, 32, 3), np.uint8)
            metadata = {"total_num_frames": 2, "fps": 1.0, "duration": 2.0, "frames_indices": [0, 1]}
            with pytest.raises(VLLMValidationError, match=r"At most 0 video\(s\)"):
                llm.generate({"prompt": "<|video|>", "multi_modal_data": {"video": (frames, metadata)}}, params)
            assert len(llm.generate(prompts[0], params)[0].outputs[0].token_ids) == MAX_TOKENS  # still serving
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    for output, (prompt_ids, tokens, logprobs) in zip(outputs, hf_greedy(path, chats)):
        got = list(output.outputs[0].token_ids)
        assert output.prompt_token_ids == prompt_ids  # vLLM expanded the image placeholders as HF does
        assert got == tokens
        got_logprobs = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, got)]
        np.testing.assert_allclose(got_logprobs, logprobs, atol=LOGPROB_ATOL, rtol=0)
