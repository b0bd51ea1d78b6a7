"""Random-weight Hugging Face checkpoints (with a tokenizer) for trying jaxllm without hub access.

Every checkpoint is a normal Hugging Face folder -- ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` -- so ``vllm serve OUT_DIR``, ``transformers.AutoConfig`` /
``AutoTokenizer`` / ``AutoModelForCausalLM`` and our own loaders all accept it.

Architectures:

* ``llama``  -- ``LlamaForCausalLM`` (plain Llama 3), for tpu-inference's built-in Llama path.
* ``llama4`` -- ``Llama4ForCausalLM``; with ``multimodal=True`` ``Llama4ForConditionalGeneration``
  with a tiny vision tower (text weights under ``language_model.``).  Mixes MoE and dense layers,
  chunked attention, NoPE layers (every 4th), QK-norm, attention temperature tuning and llama3
  RoPE scaling, all sized so that short test prompts exercise them.
* ``gemma4`` -- ``Gemma4ForCausalLM``; with ``multimodal=True`` ``Gemma4ForConditionalGeneration``
  with a tiny vision tower (text weights under ``model.language_model.``, no audio tower).
  5 sliding + 1 full attention layers, different head dims for the two, final logit soft-capping,
  tied embeddings.  Dense by default; MoE, k == v attention, KV sharing and per-layer inputs are
  enabled through config overrides.

Sizes: ``tiny`` (0.4M-1.7M parameters, builds in well under a second once torch and
transformers are imported) for tests, ``small`` (30M-50M) for demos and benchmarks.

Weights are transformers' own random init under ``torch.manual_seed(seed)``, with the std
(``initializer_range``) picked per architecture so greedy decoding does not get stuck on one
token.  Tensors that transformers initialises to a constant (norm weights, Gemma 4 layer
scalars, router scales) are multiplied by random factors around 1, so a loader that drops or
swaps them changes the output; so do the vision tower's zero-initialised biases (set to small
random values).  The text weights of a multimodal checkpoint differ from the text-only
checkpoint built with the same seed.

Multimodal checkpoints also carry what a released one has for its processor, written by
transformers' own classes and sized to the tiny vision tower: ``processor_config.json``,
``preprocessor_config.json`` (the image processor), ``chat_template.jinja`` (a template that
renders image parts as the processor's placeholder) and a tokenizer with the image tokens
(Llama 4: ``<|image|>``, ``<|patch|>`` = ``image_token_index``, ``<|image_start|>`` /
``<|image_end|>``, tile separators; Gemma 4: ``<|image>`` ``<|image|>`` ``<image|>``, video and
audio tokens, named in the tokenizer as Gemma4Processor expects).  ``AutoProcessor`` and
vLLM's multimodal processors accept them: Llama 4 tiles images into 56x56 tiles of 4x4 patches
(4 ``<|patch|>`` tokens per tile after pixel shuffle, up to 16 tiles plus a global one);
Gemma 4 resizes them to at most 70 soft tokens of 3x3 patches of 16x16 pixels.

The tokenizer is a byte-level BPE trained on a small English corpus embedded in this file
(1024 tokens for tiny, 4096 for small; unused ids are filled with reserved special tokens).

Python::

    from jaxllm.checkpoints import build_checkpoint, cached_checkpoint
    path = build_checkpoint("/tmp/g4", "gemma4", enable_moe_block=True)
    path = cached_checkpoint("llama4", "tiny", multimodal=True)   # built once, then reused

Command line::

    python -m jaxllm.checkpoints --arch gemma4 --size tiny [--multimodal] [--seed N]
        [--dtype float32|bfloat16] [--verify] OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ARCHS = ("llama", "llama4", "gemma4")
SIZES = ("tiny", "small")
DTYPES = ("float32", "bfloat16")

# Tokenizer vocabulary per size; the model's vocab_size is always the tokenizer's.
VOCAB_SIZE = {"tiny": 1024, "small": 4096}

# Per-size text config fields.  Everything that does not depend on the size lives in the
# per-arch config builders below.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        # head_dim 128 on purpose: the standard tpu-inference attention kernel layout.
        "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                     max_position_embeddings=2048),
        "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                      max_position_embeddings=8192),
    },
    "llama4": {
        "tiny": dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, num_local_experts=4, attention_chunk_size=16, floor_scale=8,
                     max_position_embeddings=2048, rope_original_max_position_embeddings=256),
        "small": dict(hidden_size=512, intermediate_size=512, intermediate_size_mlp=1536,
                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=128, num_local_experts=8, attention_chunk_size=256, floor_scale=64,
                      max_position_embeddings=8192, rope_original_max_position_embeddings=1024),
    },
    "gemma4": {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     global_head_dim=64, num_global_key_value_heads=1, sliding_window=8,
                     max_position_embeddings=2048),
        "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                      global_head_dim=256, num_global_key_value_heads=1, sliding_window=128,
                      max_position_embeddings=8192),
    },
}

# Gemma 4 MoE fields, filled in only when an override sets enable_moe_block=True (vLLM treats
# `num_experts is not None` as "this is an MoE model", so they must stay None otherwise).
GEMMA4_MOE = {
    "tiny": dict(num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "small": dict(num_experts=8, top_k_experts=2, moe_intermediate_size=256),
}

# Random init std (config.initializer_range), chosen so greedy decoding does not get stuck on
# one token.  With transformers' default 0.02 the untied Llama / Llama 4 models produce nearly
# flat logits (std ~0.2-0.4) and small llama repeats a single token forever; 0.1 gives logits
# with std ~1.5-2.3 and varied output.  Gemma 4 is the opposite: its embeddings are tied and
# scaled by sqrt(hidden), so a larger std makes every generated token predict itself again
# (small: constant output from 0.05 up); its default 0.02 works (logit std ~0.16 tiny, ~0.45
# small -- compare greedy tokens in float32, not bfloat16).
INITIALIZER_RANGE = {"llama": 0.1, "llama4": 0.1, "gemma4": 0.02}

# Multimodal checkpoints: Gemma 4's soft-token budget per image (its vision_config's
# default_output_length and its image processor's max_soft_tokens) and Llama 4's maximum number
# of tiles per image (its image processor's max_patches, the released value).
GEMMA4_SOFT_TOKENS = 70
LLAMA4_MAX_TILES = 16


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Special tokens, chat template and multimodal placeholder tokens per model family.  The tokens
# are the real models' spellings (Llama 4 / Gemma 4); ids are ours.
TOKEN_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot|>",
        "pad": "<pad>",
        # Tokens generation stops at; the first is the tokenizer's eos_token.
        "stop": ["<|eot|>", "<|end_of_text|>"],
        "extra": ["<|end_of_text|>", "<|header_start|>", "<|header_end|>",
                  "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                  "<|tile_x_separator|>", "<|tile_y_separator|>"],
        "chat_template": (
            "{{- bos_token }}"
            "{%- for message in messages %}"
            "{{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
            "{{- message['content'] | trim }}"
            "{{- '<|eot|>' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}"
            "{{- '<|header_start|>assistant<|header_end|>\n\n' }}"
            "{%- endif %}"
        ),
        # Multimodal checkpoints: content may also be a list of {"type": "image"} / {"type":
        # "text", "text": ...} parts, an image rendered as the processor's `<|image|>`
        # placeholder (as in Llama 4's own template); plain-string content renders as above.
        "mm_chat_template": (
            "{{- bos_token }}"
            "{%- for message in messages %}"
            "{{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
            "{%- if message['content'] is string %}"
            "{{- message['content'] | trim }}"
            "{%- else %}"
            "{%- for part in message['content'] %}"
            "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
            "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
            "{%- endfor %}"
            "{%- endif %}"
            "{{- '<|eot|>' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}"
            "{{- '<|header_start|>assistant<|header_end|>\n\n' }}"
            "{%- endif %}"
        ),
    },
    "gemma": {
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "stop": ["<eos>", "<turn|>"],
        "extra": ["<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|video|>",
                  "<|audio>", "<audio|>", "<|audio|>"],
        "chat_template": (
            "{{- bos_token }}"
            "{%- for message in messages %}"
            "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{- '<|turn>' + role + '\n' + (message['content'] | trim) + '<turn|>\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}"
            "{{- '<|turn>model\n' }}"
            "{%- endif %}"
        ),
        "mm_chat_template": (
            "{{- bos_token }}"
            "{%- for message in messages %}"
            "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{- '<|turn>' + role + '\n' }}"
            "{%- if message['content'] is string %}"
            "{{- message['content'] | trim }}"
            "{%- else %}"
            "{%- for part in message['content'] %}"
            "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
            "{%- elif part['type'] == 'video' %}{{- '<|video|>' }}"
            "{%- elif part['type'] == 'audio' %}{{- '<|audio|>' }}"
            "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
            "{%- endfor %}"
            "{%- endif %}"
            "{{- '<turn|>\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}"
            "{{- '<|turn>model\n' }}"
            "{%- endif %}"
        ),
        # Named in the multimodal tokenizer (`tokenizer.image_token`, ...), where Gemma4Processor
        # looks for them.
        "mm_named_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                            "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
    },
}
ARCH_FAMILY = {"llama": "llama", "llama4": "llama", "gemma4": "gemma"}

# A small English corpus (written for this file) to train the BPE on.  Varied topics so the
# merges look like real sub-words; digits, punctuation and a bit of code for good measure.
CORPUS = """\
The morning began with a thin grey fog that rolled in from the harbour and settled over the
town like a damp woollen blanket. Fishermen walked down to the boats in silence, carrying nets,
buckets and thermoses of coffee. By nine o'clock the sun had burned through, and the water
sparkled so brightly that the gulls seemed to glow as they circled above the market.

In the old bakery on Station Street, Margaret kneaded dough while her grandson counted coins at
the till. "Four loaves of rye, two dozen rolls, and one apple pie for Mrs. Henderson," he read
from the order book. Margaret nodded, wiped flour from her forehead, and asked him to fetch more
butter from the cellar. The smell of cinnamon, yeast and warm bread drifted out into the street,
and passers-by slowed down, hesitated, and then came inside.

Computers were once enormous machines that filled entire rooms. Engineers programmed them with
punched cards, switches and cables, and a single calculation could take hours. Transistors
replaced vacuum tubes, integrated circuits replaced transistors, and today a phone in your pocket
is millions of times faster than those early computers. Modern processors contain billions of
transistors, organised into cores, caches, registers and vector units that work in parallel.

A language model reads a sequence of tokens and predicts the next one. Each token is mapped to
an embedding vector; the vectors flow through layers of attention and feed-forward networks, and
the final layer produces a probability for every word in the vocabulary. During generation the
model samples a token, appends it to the sequence, and repeats. Caching the keys and values of
earlier tokens makes each new step much cheaper than the first.

Dear Thomas, thank you for your letter and for the beautiful photographs of the mountains. We
are all well here, although the garden has suffered from the dry summer. The tomatoes are small
but sweet, the beans climbed over the fence, and the roses bloomed twice. Your sister started her
new job at the library in September; she says the children's section is noisy but wonderful.
Please write again soon, and tell us when you plan to visit. With love, Grandmother.

To make a simple vegetable soup, chop two onions, three carrots, four potatoes and a stick of
celery. Heat a spoonful of olive oil in a large pan, add the onions and cook them gently for five
minutes. Add the other vegetables, pour in one and a half litres of stock, season with salt and
pepper, and simmer for about twenty-five minutes. Blend half of the soup if you prefer it thick,
then stir in a handful of fresh parsley before serving with crusty bread.

"Where are we going?" asked the girl. "Somewhere quiet," answered her father, "where we can watch
the stars without any street lights." They drove for an hour along narrow country roads, past
farms, forests and sleeping villages, until they reached a hill above a lake. There they lay on a
blanket and counted satellites, shooting stars and the faint band of the Milky Way. It was the
most peaceful night she could remember, and she fell asleep before midnight.

Scientists study the climate by measuring temperature, rainfall, wind and ocean currents across
the whole planet. Satellites observe clouds and ice from orbit, while buoys and weather stations
record data on the surface. The measurements are combined in numerical models that divide the
atmosphere into a grid of cells. Each cell exchanges heat, moisture and momentum with its
neighbours, and powerful supercomputers advance the simulation through time, step by step.

History is full of surprising connections. The printing press spread new ideas across Europe,
trade routes carried spices, silk and stories between continents, and railways changed how people
thought about distance and time. In 1869 the first transcontinental railroad was completed; in
1903 the Wright brothers flew for twelve seconds; in 1969 astronauts walked on the Moon. Every
generation inherits the knowledge, questions and unfinished work of the one before it.

The meeting is scheduled for Tuesday, 14 March, at 10:30 in room 204. Please bring your reports,
your laptop and any questions about the budget. The agenda includes: 1) last quarter's results,
2) hiring plans for the engineering and design teams, 3) the new office in Lisbon, and 4) any
other business. Coffee, tea and biscuits will be provided. If you cannot attend, send a short
summary to the project manager by Monday evening.

def greet(name: str, times: int = 1) -> str:
    # Return a friendly greeting, repeated a number of times.
    message = f"Hello, {name}!"
    return " ".join([message] * times)

for index, value in enumerate(range(10)):
    if value % 2 == 0:
        print(index, value, greet("world"))

Music has always accompanied human life. Shepherds played flutes carved from bone, monks sang
chants in stone churches, and orchestras performed symphonies for kings and crowds. Today people
listen to songs through headphones on buses and trains, dance at festivals, and learn to play the
guitar, piano or violin from online videos. Rhythm, melody and harmony seem to speak to something
deep in every culture, young and old, rich and poor.

The small robot rolled across the kitchen floor, bumped gently into a chair, turned left and
continued its patrol. Its sensors measured distance, light and sound, and a tiny camera looked for
crumbs. When the battery ran low it returned to the charging station beneath the window and
played a cheerful little tune. The cat, who had watched the whole performance from the top of
the fridge, yawned, stretched and went back to sleep.
"""


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


def build_tokenizer(family: str, vocab_size: int, model_max_length: int, multimodal: bool = False):
    """Train a byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast``.

    Special tokens come first (ids 0, 1, ...); unused ids at the end of the vocabulary are
    filled with ``<|reserved_special_token_N|>`` so the size is exactly ``vocab_size``.
    ``multimodal``: the same vocabulary (same ids), with the chat template that renders image
    parts and the family's named multimodal tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKEN_FAMILIES[family]
    specials = [spec["bos"], spec["eos"], spec["pad"]]
    if family == "gemma":  # Gemma's conventional ids: pad 0, eos 1, bos 2.
        specials = [spec["pad"], spec["eos"], spec["bos"]]
    specials += [t for t in spec["extra"] if t not in specials]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    n_reserved = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_reserved)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)

    bos = spec["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    named = dict(extra_special_tokens=spec["mm_named_tokens"]) if multimodal and "mm_named_tokens" in spec else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        chat_template=spec["mm_chat_template" if multimodal else "chat_template"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **named,
    )


def _token_ids(tokenizer, family: str) -> dict[str, Any]:
    """bos / eos / pad ids for the model config; eos lists every stop token."""
    spec = TOKEN_FAMILIES[family]
    return dict(
        bos_token_id=tokenizer.convert_tokens_to_ids(spec["bos"]),
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in spec["stop"]],
        pad_token_id=tokenizer.convert_tokens_to_ids(spec["pad"]),
    )


def _save_tokenizer(tokenizer, family: str, out: Path, keep_jinja: bool = False) -> None:
    """``keep_jinja``: leave ``chat_template.jinja`` (a processor's template, read from there)."""
    tokenizer.save_pretrained(out)
    # Pin the generic class name (transformers 5 writes its internal "TokenizersBackend") and
    # write special_tokens_map.json, which transformers 5 no longer emits, for other readers.
    spec = TOKEN_FAMILIES[family]
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Keep the chat template in tokenizer_config.json (transformers 5 moves it to a .jinja file).
    cfg["chat_template"] = tokenizer.chat_template
    if keep_jinja:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    else:
        (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Model configs, one builder per architecture: (size, tokenizer, multimodal, overrides) ->
# (config, model class).  Overrides update the *text* config kwargs before the config is
# constructed, so fields that transformers derives (layer_types, moe_layers, no_rope_layers,
# per_layer_config) are derived from the overridden values.
# --------------------------------------------------------------------------------------------


def _llama_config(size, tokenizer, multimodal, overrides):  # text only
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        PRESETS["llama"][size],
        vocab_size=len(tokenizer),
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        initializer_range=INITIALIZER_RANGE["llama"],
        **_token_ids(tokenizer, "llama"),
    )
    kw.update(overrides)
    return LlamaConfig(**kw), LlamaForCausalLM


def _llama4_config(size, tokenizer, multimodal, overrides):
    from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                              Llama4TextConfig, Llama4VisionConfig)

    kw = dict(PRESETS["llama4"][size])
    original_max = kw.pop("rope_original_max_position_embeddings")  # goes into rope_parameters
    kw.update(
        vocab_size=len(tokenizer),
        hidden_act="silu",
        rms_norm_eps=1e-5,
        # HF's router takes any top-k; the released Llama 4 models use top-1.
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,   # layers 1, 3, ... are MoE, the others dense
        no_rope_layer_interval=4,      # layers 3, 7, ... are NoPE (global attention)
        use_qk_norm=True,
        attn_temperature_tuning=True,
        attn_scale=0.1,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max,
        },
        tie_word_embeddings=False,
        initializer_range=INITIALIZER_RANGE["llama4"],
        **_token_ids(tokenizer, "llama"),
    )
    kw.update(overrides)
    text_config = Llama4TextConfig(**kw)
    if not multimodal:
        return text_config, Llama4ForCausalLM

    # Tiny vision tower: 56x56 images, 14x14 patches -> 4x4 patches -> 2x2 after pixel shuffle.
    # The adapter requires intermediate_size == 4 * hidden_size (pixel shuffle ratio 0.5) and
    # vision_output_dim == projector_output_dim.
    vision_config = Llama4VisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
        projector_output_dim=64, pixel_shuffle_ratio=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=INITIALIZER_RANGE["llama4"],
    )
    config = Llama4Config(
        text_config=text_config,
        vision_config=vision_config,
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),
        tie_word_embeddings=False,
    )
    return config, Llama4ForConditionalGeneration


def _gemma4_config(size, tokenizer, multimodal, overrides):
    from transformers import (Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration,
                              Gemma4TextConfig, Gemma4VisionConfig)

    kw = dict(
        PRESETS["gemma4"][size],
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=0,   # no per-layer inputs (PLE) unless overridden
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        attention_k_eq_v=False,
        num_kv_shared_layers=0,
        enable_moe_block=False,
        # rope_parameters: transformers' default -- sliding layers plain RoPE (theta 1e4), full
        # layers "proportional" RoPE with partial_rotary_factor 0.25 (theta 1e6).
        initializer_range=INITIALIZER_RANGE["gemma4"],
        **_token_ids(tokenizer, "gemma"),
    )
    kw.update(overrides)
    if kw["enable_moe_block"]:
        for key, value in GEMMA4_MOE[size].items():
            if kw.get(key) is None:
                kw[key] = value
    if kw["num_kv_shared_layers"] and "layer_types" not in overrides:
        # Shared layers reuse the KV of the last non-shared layer of the same type, so both
        # types must occur before the shared block: use a 2-sliding:1-full pattern instead.
        kw["layer_types"] = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                             for i in range(kw["num_hidden_layers"])]
    text_config = Gemma4TextConfig(**kw)
    if not multimodal:
        return text_config, Gemma4ForCausalLM

    # Tiny vision tower.  Images are resized to at most GEMMA4_SOFT_TOKENS soft tokens of 3x3
    # patches of 16x16 pixels (70 is the smallest budget the image processor accepts); a patch
    # coordinate reaches at most 70 * 3 - 1 (a 3-patch-high strip), inside the 256-entry position
    # tables.  `default_output_length` is not a transformers field: vLLM reads it (the released
    # configs carry it) as the soft-token budget per image.
    vision_config = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
        position_embedding_size=256, initializer_range=INITIALIZER_RANGE["gemma4"],
        default_output_length=GEMMA4_SOFT_TOKENS,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,               # no audio tower
        boi_token_id=ids("<|image>"),
        eoi_token_id=ids("<image|>"),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"),
        initializer_range=INITIALIZER_RANGE["gemma4"],
        tie_word_embeddings=True,
    )
    return config, Gemma4ForConditionalGeneration


CONFIG_BUILDERS = {"llama": _llama_config, "llama4": _llama4_config, "gemma4": _gemma4_config}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _perturb_constant_tensors(model, generator) -> None:
    """Scale every constant, finite, non-zero tensor (norm weights, Gemma 4 layer scalars,
    router scales, ...) by 1 + 0.1 * N(0, 1) element-wise.

    transformers initialises these to exactly 1, which would hide a loader that drops or
    swaps them; random values make such bugs change the logits.
    """
    import torch

    with torch.no_grad():
        for tensor in model.state_dict().values():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            first = tensor.flatten()[0]
            if torch.isfinite(first) and first != 0 and torch.all(tensor == first):
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.mul_((1 + 0.1 * noise).to(tensor.dtype))


# Multimodal parts outside the text model, by their module name in transformers' model.
VISION_MODULES = ("vision_model", "multi_modal_projector", "vision_tower", "embed_vision")


def _randomize_zero_vision_tensors(model, generator) -> None:
    """Give the vision tower's zero-initialised tensors (Llama 4's biases and layer-norm shifts)
    small random values, so a loader that drops them changes the image features.  Only vision
    tensors: the text weights stay those of the same seed without it."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not any(f"{part}." in name for part in VISION_MODULES):
                continue
            if tensor.is_floating_point() and tensor.numel() and not tensor.any():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator, dtype=torch.float32))


def _save_processor(arch: str, config, tokenizer, out: Path) -> None:
    """Write a released checkpoint's processor files (``processor_config.json``,
    ``preprocessor_config.json``, ``chat_template.jinja``) with transformers' own processor
    classes, set up to match the tiny vision tower in ``config``."""
    vision = config.vision_config
    if arch == "llama4":
        from transformers import Llama4ImageProcessor, Llama4Processor

        # Tiles of the vision tower's image size; each tile is patch_size x patch_size patches,
        # pixel-shuffled into (image_size / patch_size)^2 * ratio^2 <|patch|> tokens.
        image_processor = Llama4ImageProcessor(size={"height": vision.image_size, "width": vision.image_size},
                                               max_patches=LLAMA4_MAX_TILES)
        processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    patch_size=vision.patch_size, pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
                                    chat_template=tokenizer.chat_template)
    else:
        from transformers import (Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor,
                                  Gemma4VideoProcessor)

        patches = dict(patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size)
        image_processor = Gemma4ImageProcessor(max_soft_tokens=vision.default_output_length, **patches)
        processor = Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
            tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(**patches),
            chat_template=tokenizer.chat_template, image_seq_length=vision.default_output_length)
    processor.save_pretrained(out)  # processor_config.json (all parts), chat_template.jinja, tokenizer
    # transformers 5 folds the image processor into processor_config.json; released checkpoints
    # also carry it as preprocessor_config.json, which other readers look for.
    image_processor.save_pretrained(out)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _add_readable_config_fields(out: Path, arch: str, config) -> None:
    """transformers 5 stores Gemma 4's ``global_head_dim`` / ``num_global_key_value_heads`` only
    inside ``per_layer_config``; also write them as top-level fields, like the released
    checkpoints' config.json.  (They are ignored on load when per_layer_config is present.)"""
    if arch != "gemma4":
        return
    path = out / "config.json"
    data = json.loads(path.read_text())
    text = data.get("text_config", data)
    text_config = _text_config(config)
    full = text_config.layer_types.index("full_attention")
    text["global_head_dim"] = text_config.per_layer_config[full].head_dim
    text["num_global_key_value_heads"] = (
        text_config.per_layer_config[full].num_key_value_heads
        if text_config.attention_k_eq_v else None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_checkpoint(
    out_dir: str | os.PathLike,
    arch: str,
    size: str = "tiny",
    *,
    multimodal: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint plus tokenizer to ``out_dir`` and return its path.

    ``config_overrides`` update the text config fields, e.g. ``attention_k_eq_v=True``,
    ``enable_moe_block=True``, ``num_kv_shared_layers=2``, ``hidden_size_per_layer_input=16``
    (gemma4) or ``interleave_moe_layer_step=1``, ``attention_chunk_size=8``,
    ``no_rope_layers=[...]`` (llama4).
    """
    import torch
    from transformers import GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if multimodal and arch == "llama":
        raise ValueError("arch 'llama' has no multimodal variant")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = ARCH_FAMILY[arch]

    max_len = config_overrides.get("max_position_embeddings",
                                   PRESETS[arch][size]["max_position_embeddings"])
    tokenizer = build_tokenizer(family, VOCAB_SIZE[size], model_max_length=max_len, multimodal=multimodal)
    config, model_cls = CONFIG_BUILDERS[arch](size, tokenizer, multimodal, config_overrides)

    torch.manual_seed(seed)
    model = model_cls(config)
    _perturb_constant_tensors(model, torch.Generator().manual_seed(seed + 1))
    if multimodal:
        _randomize_zero_vision_tensors(model, torch.Generator().manual_seed(seed + 2))
    # Like model.to(dtype), but leaves complex buffers (Llama 4's vision RoPE) alone.
    target = getattr(torch, dtype)
    model._apply(lambda t: t.to(target) if t.is_floating_point() else t)
    model.config.dtype = dtype

    ids = _token_ids(tokenizer, family)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out, safe_serialization=True)
    _add_readable_config_fields(out, arch, config)
    if multimodal:
        _save_processor(arch, config, tokenizer, out)
    _save_tokenizer(tokenizer, family, out, keep_jinja=multimodal)
    return out


def parameter_count(path: str | os.PathLike) -> int:
    """Number of parameters stored in a checkpoint folder (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _cache_key(arch: str, size: str, kw: dict[str, Any]) -> str:
    args = json.dumps({"arch": arch, "size": size, **kw}, sort_keys=True, default=str)
    digest = hashlib.sha256(args.encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def cached_checkpoint(arch: str, size: str = "tiny", **kw: Any) -> Path:
    """Like :func:`build_checkpoint`, but build only once into a cache folder and reuse it.

    The folder is ``$JAXLLM_CHECKPOINT_CACHE`` (default ``~/.cache/jaxllm/checkpoints``) /
    ``<arch>-<size>[-mm]-<hash of the arguments and of this file's source>``.  Builds go to a
    temporary folder that is renamed into place, so concurrent callers never see a partial one.
    """
    root = Path(os.environ.get("JAXLLM_CHECKPOINT_CACHE")
                or Path.home() / ".cache" / "jaxllm" / "checkpoints")
    name = f"{arch}-{size}{'-mm' if kw.get('multimodal') else ''}-{_cache_key(arch, size, kw)}"
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache should read like any other folder
    try:
        build_checkpoint(tmp, arch, size, **kw)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# Long enough (~40 tokens) to cross the tiny models' attention chunk and sliding window.
VERIFY_PROMPT = ("The small robot rolled across the kitchen floor, bumped gently into a chair, "
                 "turned left and continued its patrol while the cat watched from the fridge.")


def verify_checkpoint(path: str | os.PathLike, prompt: str = VERIFY_PROMPT,
                      steps: int = 10) -> list[int]:
    """Load a checkpoint with transformers, check the tokenizer round-trips text, and
    greedy-generate ``steps`` tokens; raises if they are all the same.  Returns the tokens."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoTokenizer)

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Hello world! The 3 little robots baked 12 loaves of bread."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text, tokenizer.decode(ids)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                         tokenize=False, add_generation_prompt=True)
    assert "Hi there" in chat, chat

    config = AutoConfig.from_pretrained(path)
    auto_cls = AutoModelForImageTextToText if hasattr(config, "vision_config") \
        else AutoModelForCausalLM
    model = auto_cls.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    if len(set(new_tokens)) < 2:
        raise AssertionError(f"degenerate greedy output: {new_tokens}")
    return new_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.checkpoints",
        description="Write a random-weight Hugging Face checkpoint plus tokenizer.")
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--multimodal", action="store_true",
                        help="llama4/gemma4: the image-text-to-text model with a tiny vision tower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--verify", action="store_true",
                        help="reload with transformers and greedy-generate a few tokens")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    path = build_checkpoint(args.out_dir, args.arch, args.size, multimodal=args.multimodal,
                            seed=args.seed, dtype=args.dtype)
    elapsed = time.perf_counter() - start
    arch_name = json.loads((path / "config.json").read_text())["architectures"][0]
    print(f"wrote {path.resolve()}")
    print(f"  architecture: {arch_name} ({args.arch}, {args.size}, {args.dtype})")
    print(f"  parameters:   {parameter_count(path):,}")
    print(f"  build time:   {elapsed:.2f} s")
    if args.verify:
        tokens = verify_checkpoint(path)
        print(f"  verified:     greedy tokens {tokens}")


if __name__ == "__main__":
    main()
