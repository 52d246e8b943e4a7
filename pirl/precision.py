"""Numeric format of the forward pass: autocast dtype and memory format, shared by the trainer,
`pirl throughput` (which measures exactly what training runs) and `pirl benchmark`'s frozen trunk.

- `MODEL.AMP_PARAMS.USE_AMP`: the forward pass under torch.autocast in AMP_DTYPE (bfloat16 by
  default) on GPU and on CPU, in training and in the benchmark alike; the loss, the memory bank,
  the optimizer and the benchmark's heads stay float32. float16 gets a gradient scaler;
  bfloat16 needs none.
- `MODEL.CHANNELS_LAST`: model and inputs in NHWC, the layout oneDNN and cuDNN convolve fastest.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn

from pirl.schema import AmpParams, Model

log = logging.getLogger("pirl")

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(model_cfg: Model, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype, or None for float32 throughout."""
    return amp_dtype(model_cfg.AMP_PARAMS, device)


def amp_dtype(amp: AmpParams, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an AMP_PARAMS section (pretraining's or the benchmark's) asks for on
    `device`, or None for float32."""
    if not amp.USE_AMP:
        return None
    dtype = AMP_DTYPES[amp.AMP_DTYPE]
    if device.type == "cpu" and not _cpu_has_fast(dtype):
        log.warning(
            "MODEL.AMP_PARAMS.USE_AMP with %s on a CPU without native %s support: the step will "
            "be slower than float32; set config.MODEL.AMP_PARAMS.USE_AMP=false",
            amp.AMP_DTYPE,
            amp.AMP_DTYPE,
        )
    return dtype


def _cpu_has_fast(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler for float16 (whose gradients underflow); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def place_model(model: nn.Module, model_cfg: Model, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if model_cfg.CHANNELS_LAST else model


def place_input(x: torch.Tensor, model_cfg: Model, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if model_cfg.CHANNELS_LAST else x
