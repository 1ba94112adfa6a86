"""Backbone precision vocabulary (no torch at import): ``fp32``, ``bf16`` (torch autocast + channels_last) and
``int8`` (post-training static quantization through OpenVINO / NNCF, ``adspine.backbones.openvino_backend``).

Methods always receive float32 feature maps whatever the backbone's precision; only the backbone's forward changes.
"""

from __future__ import annotations

import importlib.util

PRECISIONS = ("fp32", "bf16", "int8")
TORCH_PRECISIONS = ("fp32", "bf16")  # run by ``FeatureExtractor`` itself
DEFAULT_PRECISION = "fp32"
INT8_MODULE = "adspine.backbones.openvino_backend"


class PrecisionError(ValueError):
    """An unknown or unusable precision; the message is one line naming the value."""


def check_precision(value: object) -> str:
    """``value`` if it is one of ``PRECISIONS``, else a one-line ``PrecisionError``."""
    if value not in PRECISIONS:
        raise PrecisionError(f"precision {value!r} is not one of {', '.join(PRECISIONS)}")
    return str(value)


def int8_problem() -> str | None:
    """Why int8 cannot run here (one line), or None when the OpenVINO backend and its libraries are installed."""
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    try:
        backend = importlib.util.find_spec(INT8_MODULE) is not None
    except ImportError:
        backend = False
    if not backend:
        missing.append(INT8_MODULE)
    if missing:
        return (f"int8 needs OpenVINO/NNCF: {', '.join(missing)} not installed here "
                f"(pip install 'adspine[export]', or use fp32 / bf16)")
    return None


def precision_note(precision: str, device: str = "cpu") -> str | None:
    """One line when a precision runs differently from what its name promises on ``device`` (bf16 emulated on a
    CPU without bf16 matrix hardware; bf16 autocast on cuda), else None."""
    if precision != "bf16":
        return None
    if device == "cuda":
        import torch

        hardware = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bf16 on cuda: torch.autocast bfloat16 (fp16 autocast would apply the same way)" if hardware else
                "bf16 on cuda runs emulated here (no bf16 tensor cores): slower than fp32")
    from adspine.methods.screen import fast_bf16

    return None if fast_bf16() else "bf16 runs emulated here (no AMX / AVX512-BF16 on this CPU): slower than fp32"
