"""Speed-ups for a frozen backbone that change results by float rounding only.

- channels-last: the patch convolution reads NHWC, the layout GPU convolution kernels
  prefer (the worker's GPU preprocessing hands it NHWC batches). On CPU it buys nothing:
  the patch embedding is well under 1 % of a ViT forward.
- ``torch.compile`` of the image tower's blocks, in place (``nn.Module.compile`` keeps the
  state-dict names), with dynamic shapes: WinCLIP's window passes and a stream's last,
  partial batch change sequence and batch lengths, which must not recompile each time.
  CUDA graphs (``mode="reduce-overhead"``) are not offered: the methods hold tapped block
  outputs while later blocks run, and a graph replay would overwrite them in place.
"""

from __future__ import annotations

import logging

import torch

from .backbone import Backbone

log = logging.getLogger(__name__)


def use_channels_last(backbone: Backbone) -> None:
    backbone.clip.visual.conv1.to(memory_format=torch.channels_last)


def compile_blocks(backbone: Backbone) -> None:
    """Compile each image-tower block on its first call (that first batch takes seconds to minutes)."""
    for block in backbone.clip.visual.transformer.resblocks:
        block.compile(dynamic=True)
    log.info("image tower blocks of %s will be compiled on first use", backbone.identity)


def accelerate(backbone: Backbone, *, compile: bool = False) -> Backbone:
    """What the device supports: channels-last on CUDA; compiled blocks when asked."""
    if backbone.device.type == "cuda":
        use_channels_last(backbone)
    if compile:
        compile_blocks(backbone)
    return backbone


def uncompile_blocks(backbone: Backbone) -> None:
    """Back to eager blocks (``nn.Module.compile`` keeps the compiled call in this attribute)."""
    for block in backbone.clip.visual.transformer.resblocks:
        block._compiled_call_impl = None
