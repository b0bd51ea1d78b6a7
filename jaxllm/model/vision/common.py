"""What both image encoders need on the host side: vLLM's processor outputs as arrays."""

from __future__ import annotations

import numpy as np


def host_array(value) -> np.ndarray:
    """A CPU torch tensor (as vLLM's processor hands it over, bf16 included), numpy or jax array as numpy."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with vLLM
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            import ml_dtypes

            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)
