"""Errors shared by the model's config readers."""


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something jaxllm does not implement."""
