"""Multimodal checkpoints served by jaxllm's models: image input, and the modalities they refuse.

- vLLM's processor for Gemma 4 also takes audio and video, which jaxllm's Gemma 4
  does not serve. Their `--limit-mm-per-prompt` becomes 0 at start-up, so vLLM's
  own input processing refuses a request that carries them (HTTP 400 "At most 0
  audio(s) may be provided in one prompt") and the server goes on. A limit the
  user set above 0 for such a modality fails start-up instead, naming it.
- Gemma 4 E2B / E4B compute per-layer inputs from the token ids, which
  tpu-inference's runner drops once a step is embedded for a multimodal model
  (its warm-up compiles that step without them, too): for models that say they
  need them (`needs_token_ids`), the runner passes the ids beside the embeddings.
  Gemma 4 31B / 26B-A4B need them too, to find the images' runs of soft tokens.
- Those two attend bidirectionally within each image (`use_bidirectional_attention=
  "vision"`), which is exact only if an image is never split across steps: the
  scheduler is told so (`disable_chunked_mm_input`), as vLLM does on GPU.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from jaxllm.vllm_plugin.patching import Patch, install

logger = init_logger("vllm.jaxllm")


def install_all() -> None:
    install(Patch("tpu_inference.platforms.tpu_platform", "TpuPlatform.check_and_update_config",
                  "limit to 0 the input modalities jaxllm's model does not serve (refused per request); "
                  "keep images whole in a step where they attend to themselves bidirectionally",
                  _refusing_unserved_modalities))
    install(Patch("tpu_inference.runner.tpu_runner", "TPUModelRunner._get_input_ids_embeds",
                  "keep the token ids beside a multimodal step's embeddings where the model needs them",
                  _keeping_token_ids))
    install(Patch("tpu_inference.runner.compilation_manager", "CompilationManager._precompile_backbone_helper",
                  "warm up the embeddings-plus-token-ids step of models that need the ids",
                  _warming_up_with_token_ids))


def refuse_unserved_modalities(vllm_config) -> None:
    """Set the limit of every modality our model doesn't serve to 0 (or fail, where the user asked for it)."""
    from vllm.config.multimodal import AudioDummyOptions, BaseDummyOptions, ImageDummyOptions, VideoDummyOptions

    from jaxllm.vllm_plugin.models import our_class

    model_config = vllm_config.model_config
    cls = None if model_config is None else our_class(model_config.hf_config)
    mm = None if model_config is None else model_config.multimodal_config
    if cls is None or mm is None:
        return
    options = {"audio": AudioDummyOptions, "video": VideoDummyOptions}
    for modality in cls.unserved_modalities:
        asked = mm.limit_per_prompt.get(modality)
        if asked is not None and asked.count > 0:
            raise ValueError(f"--limit-mm-per-prompt {modality}={asked.count}: {cls.__name__} serves image "
                             f"input, not {modality}; set it to 0 (or leave it out)")
        mm.limit_per_prompt[modality] = options.get(modality, BaseDummyOptions)(count=0)
    if cls.unserved_modalities and "image" not in mm.limit_per_prompt:
        # tpu-inference's runner turns multimodal input off when every *listed* limit is 0
        # (tpu_runner.py, `disable_mm_from_limits`), though an unlisted one is 999: list the
        # image limit, or the images would never reach the model.
        mm.limit_per_prompt["image"] = ImageDummyOptions(count=mm.get_limit_per_prompt("image"))
    if cls.unserved_modalities:
        logger.info("jaxllm: %s refuses %s input (limit 0 per prompt)", cls.__name__,
                    " and ".join(cls.unserved_modalities))


def keep_images_whole(vllm_config) -> None:
    """Never split an image across steps for a model whose image tokens attend to each other ahead.

    Gemma 4 with `use_bidirectional_attention="vision"` lets every soft token of an image see
    the whole image (transformers' mask on sliding layers). A step attends to the cache and to
    its own tokens only: if an image were split, its first part would be computed without the
    rest (and cached so), and its logits and those of every token after it would differ from
    transformers'. vLLM does the same for such models on GPU (platforms/cuda.py); with it, vLLM
    refuses at start-up a `--max-num-batched-tokens` smaller than one image.
    """
    from jaxllm.model.causal_lm import takes_images
    from jaxllm.vllm_plugin.models import our_class

    model_config = vllm_config.model_config
    cls = None if model_config is None else our_class(model_config.hf_config)
    if cls is None or not takes_images(model_config) or not cls.attends_within_images(model_config.hf_config):
        return
    if not vllm_config.scheduler_config.disable_chunked_mm_input:
        logger.info("jaxllm: %s attends bidirectionally within each image: an image is never split across "
                    "steps (disable_chunked_mm_input)", cls.__name__)
    vllm_config.scheduler_config.disable_chunked_mm_input = True


def _refusing_unserved_modalities(check_and_update_config):
    @classmethod
    @functools.wraps(check_and_update_config)
    def wrapper(cls, vllm_config):
        refuse_unserved_modalities(vllm_config)
        keep_images_whole(vllm_config)
        return check_and_update_config(vllm_config)
    return wrapper


def _keeping_token_ids(get_input_ids_embeds):
    @functools.wraps(get_input_ids_embeds)
    def wrapper(runner, input_ids, mm_embeds, is_mm_embed):
        ids, embeds = get_input_ids_embeds(runner, input_ids, mm_embeds, is_mm_embed)
        if embeds is not None and getattr(runner.model, "needs_token_ids", False):
            return input_ids, embeds
        return ids, embeds
    return wrapper


def _warming_up_with_token_ids(precompile_backbone_helper):
    @functools.wraps(precompile_backbone_helper)
    def wrapper(manager, name, *, input_ids, inputs_embeds, **kwargs):
        if input_ids is None and inputs_embeds is not None and getattr(manager.runner.model, "needs_token_ids",
                                                                       False):
            import jax.numpy as jnp
            from jax.sharding import NamedSharding, PartitionSpec
            from tpu_inference.layers.common.sharding import ShardingAxisName

            sharding = NamedSharding(manager.runner.mesh, PartitionSpec(ShardingAxisName.ATTN_DATA))
            input_ids = manager._create_dummy_tensor((inputs_embeds.shape[0],), jnp.int32, sharding)
        return precompile_backbone_helper(manager, name, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                          **kwargs)
    return wrapper
