"""The frame encoding on the wire (JPEG): a frame's size read from its header, before a single
pixel is decoded, and the pixel budget every part that decodes frames applies.

A 20000 x 20000 JPEG can be a few MB on the wire and 1.2 GB once decoded (more in the
decoder's and the archive's working copies), so the worker and the archive sink refuse a
frame above ``max_pixels`` from its header alone, and ingest scales frames down to it.
``shrink_jpeg`` re-encodes a frame that does not fit a message.
"""

from __future__ import annotations

DEFAULT_MAX_PIXELS = 40_000_000  # 8K UHD (7680 x 4320, 33 MP) passes; a 20000 x 20000 frame does not

# start-of-frame markers (baseline, progressive, lossless, arithmetic...): not DHT (C4), JPG (C8), DAC (CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


class FrameTooLarge(ValueError):
    """A frame whose pixel count is above the budget."""


def jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header; None when ``blob`` is not a JPEG
    with one before its image data."""
    if len(blob) < 4 or blob[0] != 0xFF or blob[1] != 0xD8:
        return None
    at = 2
    while at + 4 <= len(blob):
        if blob[at] != 0xFF:
            return None
        marker = blob[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the image data before any frame header
            return None
        length = int.from_bytes(blob[at + 2:at + 4], "big")
        if marker in _SOF:
            if length < 7 or at + 9 > len(blob):
                return None
            height = int.from_bytes(blob[at + 5:at + 7], "big")
            width = int.from_bytes(blob[at + 7:at + 9], "big")
            return (width, height) if width and height else None  # height 0: defined later (DNL), unsupported
        if length < 2:
            return None
        at += 2 + length
    return None


def check_pixels(blob: bytes, max_pixels: int) -> tuple[int, int]:
    """The frame's (width, height); ValueError when its header cannot be read, FrameTooLarge
    when it has more than ``max_pixels`` pixels."""
    size = jpeg_size(blob)
    if size is None:
        raise ValueError(f"undecodable jpeg image ({len(blob)} bytes): no frame header")
    width, height = size
    if width * height > max_pixels:
        raise FrameTooLarge(f"frame of {width}x{height} ({width * height:,} px) is above the pixel budget "
                            f"(max_pixels {max_pixels:,})")
    return size


def shrink_jpeg(blob: bytes, max_bytes: int, quality: int = 85) -> bytes | None:
    """The frame re-encoded to at most ``max_bytes``: decoded at 1/1, 1/2, 1/4 or 1/8 scale
    (libjpeg scales while decoding, so a large frame never exists whole) at ``quality``;
    None when even 1/8 does not fit."""
    import cv2  # here: the settings read this module's budget, and `linewatch --help` loads no cv2
    import numpy as np

    for flag in (cv2.IMREAD_COLOR, cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_COLOR_8):
        image = cv2.imdecode(np.frombuffer(blob, np.uint8), flag)
        if image is None:
            return None
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and len(data) <= max_bytes:
            return data.tobytes()
    return None
