"""Errors shared by the model's config readers."""


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something jaxllm does not implement."""


def require(condition: bool, message: str) -> None:
    """Refuse a config that asks for what jaxllm does not implement, saying which field and value."""
    if not condition:
        raise UnsupportedConfigError(message)
