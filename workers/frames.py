"""JPEG frames -> the model's input batch ``[B, 3, S, S]`` float RGB in [0, 1], on its device.

CPU: OpenCV decodes and resizes each frame as uint8 (``scoring.pixels.square_rgb``, the same
pixels eval and the references get), and the batch is converted to float once.

GPU: nvJPEG decodes the whole batch on the device (``torchvision.io.decode_jpeg`` with a
list) and the resize runs there (antialiased bilinear down, bicubic up: close to OpenCV's
area/cubic filters, not bit-equal), so only compressed bytes cross PCIe. Where the GPU
decoder is missing, or a batch holds a frame it cannot read (it returns nothing then),
frames decode on the CPU as uint8 into pinned memory and copy without blocking: a
quarter of the bytes of float32, overlapping the copy with the host's next work. GPU
batches are channels-last, the layout the patch convolution prefers there.

nvJPEG runs on a side stream of ours. torchvision allocates its output on the caller's
current stream but writes it from a private stream that never waits for the current one;
on the main stream, while the worker keeps a batch in flight, it could be handed memory
the queued model work of the previous batch still reads or writes (seen on an H200:
scores turned into NaN and garbage). The side stream has its own memory pool; the main
stream waits for it, and the finished batch is marked as used there.

Before any of that, each frame's size is read from its JPEG header: a frame above the pixel
budget (``max_pixels``) or without a readable header is refused with the reason, so one
huge frame never costs the worker gigabytes.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..bus.jpeg import DEFAULT_MAX_PIXELS, check_pixels
from ..scoring.pixels import square_rgb

log = logging.getLogger(__name__)


class FrameDecoder:
    def __init__(self, size: int, device: str | torch.device = "cpu", gpu_decode: bool | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.size, self.max_pixels = size, max_pixels
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.gpu_decode = self.on_gpu if gpu_decode is None else gpu_decode and self.on_gpu
        if self.gpu_decode:
            try:
                from torchvision.io import decode_jpeg  # noqa: F401
            except Exception as err:  # a torchvision without its image extension
                log.warning("GPU JPEG decoding unavailable (%s); decoding on the CPU", err)
                self.gpu_decode = False
        self._side_stream = torch.cuda.Stream(self.device) if self.gpu_decode else None

    @property
    def where(self) -> str:
        return "nvjpeg" if self.gpu_decode else ("opencv+pinned" if self.on_gpu else "opencv")

    def decode(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[int], dict[int, str]]:
        """(batch of the frames that decoded, their indices in ``blobs``, {index: reason} for the rest)."""
        refused: dict[int, str] = {}
        for index, blob in enumerate(blobs):
            try:
                check_pixels(blob, self.max_pixels)
            except ValueError as err:
                refused[index] = str(err)
        if refused:
            accepted = [i for i in range(len(blobs)) if i not in refused]
            batch, kept, failed = self.decode([blobs[i] for i in accepted])
            return batch, [accepted[i] for i in kept], {**refused, **{accepted[i]: r for i, r in failed.items()}}
        if self.gpu_decode and blobs:
            try:
                return self._decode_gpu(blobs), list(range(len(blobs))), {}
            except (RuntimeError, ValueError):  # one bad frame fails the whole nvJPEG batch
                pass
        return self._decode_cpu(blobs)

    def _decode_cpu(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[int], dict[int, str]]:
        arrays, kept, failed = [], [], {}
        for index, blob in enumerate(blobs):
            try:
                image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            except cv2.error:
                image = None
            if image is None:
                failed[index] = f"undecodable jpeg image ({len(blob)} bytes)"
                continue
            try:
                arrays.append(square_rgb(image, self.size))
            except (cv2.error, ValueError) as err:  # one frame's oddity is its own dead letter
                failed[index] = f"cannot resize the frame: {' '.join(str(err).split())[:200]}"
                continue
            kept.append(index)
        if not arrays:
            return torch.empty(0, 3, self.size, self.size, device=self.device), kept, failed
        batch = torch.from_numpy(np.stack(arrays))  # [B, S, S, 3] uint8
        if self.on_gpu:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            return batch.permute(0, 3, 1, 2).float().div_(255.0), kept, failed  # NHWC strides: channels-last
        return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(), kept, failed

    def _decode_gpu(self, blobs: list[bytes]) -> torch.Tensor:
        side, main = self._side_stream, torch.cuda.current_stream(self.device)
        side.synchronize()  # the last batch's resizing is done: memory freed on this stream is truly free
        with torch.cuda.stream(side):
            out = self._decode_resize(blobs)
        main.wait_stream(side)
        out.record_stream(main)  # not reused by the side stream before the main stream is done with it
        return out

    def _decode_resize(self, blobs: list[bytes]) -> torch.Tensor:
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]  # must be on the CPU
        images = decode_jpeg(data, mode="RGB", device=self.device)  # [3, H, W] uint8 each, on the GPU
        out = torch.empty(len(images), 3, self.size, self.size, device=self.device,
                          memory_format=torch.channels_last)
        by_shape: dict[tuple[int, int], list[int]] = {}  # a stream's frames share a size: resize them together
        for index, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape[1:]), []).append(index)
        for (height, width), members in by_shape.items():
            group = torch.stack([images[i] for i in members]).float()
            if height == width == self.size:
                resized = group
            elif height > self.size:
                resized = F.interpolate(group, size=(self.size, self.size), mode="bilinear", antialias=True,
                                        align_corners=False)
            else:
                resized = F.interpolate(group, size=(self.size, self.size), mode="bicubic", align_corners=False)
            out[members] = resized.clamp_(0.0, 255.0).div_(255.0)
        return out

