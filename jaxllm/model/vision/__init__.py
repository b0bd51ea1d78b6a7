"""Image encoders of the multimodal checkpoints: vision tower plus projector into the text embedding space.

`gemma4.Gemma4ImageEncoder` and `llama4.Llama4ImageEncoder` each take exactly the keyword
arguments vLLM's multimodal processor produces for their architecture (what tpu-inference's
runner hands `embed_multimodal(**kwargs)`) and return one array of features per image, in the
text model's hidden size, in the order of that image's placeholder tokens.
"""
