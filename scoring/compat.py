"""Import open_clip on machines where torchvision's compiled ops cannot load.

open_clip imports torchvision. Where only a CUDA build of torchvision sits next to
CPU torch (our CI machines), ``import torchvision`` raises "operator torchvision::nms
does not exist" because its ``_C`` extension fails to load and its python fallbacks
register fake kernels for ops that were never defined. Defining the two op schemas
lets the import finish; linewatch never calls nms. We only do this after the real
import has failed, so a working torchvision is never touched.
"""

from __future__ import annotations

import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # keeps the schema registration alive for the process


def import_open_clip():
    global _library
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop the half-imported package before retrying
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
        import torchvision  # noqa: F401
    import open_clip

    return open_clip
