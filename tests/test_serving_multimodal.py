"""`vllm serve` of a multimodal checkpoint (tiny Gemma 4 with processor files), images through the chat API.

One server, started as users start it (no multimodal flag), queried with the `openai`
client: images as data URLs in `image_url` parts. Greedy decoding with `ignore_eos`,
so every answer has exactly `max_tokens` tokens.
"""

from __future__ import annotations

import asyncio
import base64
import io

import openai
import pytest

from jaxllm.checkpoints import cached_checkpoint
from multimodal_inputs import images
from test_serving import serve

FLAGS = ["--max-model-len", "512", "--max-num-seqs", "32", "--dtype", "float32", "--gpu-memory-utilization",
         "0.02", "--seed", "0", "--enable-prompt-tokens-details"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(cached_checkpoint("gemma4", "tiny", multimodal=True), tmp_path_factory.mktemp("serve-mm"), FLAGS)


def data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(pictures, text="Describe the image.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True})


def test_chat_with_an_image_answers_and_counts_its_tokens(server):
    client = server.client()
    with_image = client.chat.completions.create(model=server.model, messages=image_chat(images(1)), **GREEDY)
    text_only = client.chat.completions.create(model=server.model, messages=image_chat([]), **GREEDY)
    assert with_image.usage.completion_tokens == MAX_TOKENS and with_image.choices[0].message.content
    # The image's soft tokens (66 for this picture) are part of the prompt.
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 60


def test_concurrent_image_and_text_requests_all_complete(server):
    async def run():
        client = server.async_client()
        pictures = images(2, seed=5)
        image_requests = [client.chat.completions.create(model=server.model, messages=image_chat([pictures[i % 2]]),
                                                         **GREEDY) for i in range(16)]
        text_requests = [client.chat.completions.create(model=server.model,
                                                        messages=image_chat([], f"Tell story number {i}."),
                                                        **GREEDY) for i in range(8)]
        return await asyncio.gather(*image_requests, *text_requests)

    answers = asyncio.run(run())
    assert [a.usage.completion_tokens for a in answers] == [MAX_TOKENS] * 24
    # The same image and prompt, greedily, give the same answer however the batch was formed.
    assert len({a.choices[0].message.content for a in answers[0:16:2]}) == 1
    assert server.health() == 200


def test_repeated_image_hits_the_prefix_cache_with_identical_output(server):
    client = server.client()
    messages = image_chat(images(1, seed=11))
    first = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    second = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    assert second.choices[0].message.content == first.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 60, cached  # the image's tokens came from the cache


def test_malformed_image_gets_a_4xx_and_the_server_keeps_serving(server):
    client = server.client()
    broken = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
        {"type": "text", "text": "Describe the image."}]}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=broken, **GREEDY)
    answer = client.chat.completions.create(model=server.model, messages=image_chat(images(1)), **GREEDY)
    assert answer.usage.completion_tokens == MAX_TOKENS and server.health() == 200
