"""An inert ``torchvision`` for the lerobot virtualenv.

lerobot imports torchvision at module level (image transforms, its pyav video backend), but the only
torchvision wheels on PyPI for Linux are built against CUDA torch and fail to load on the CPU torch
(``operator torchvision::nms does not exist``). Reading a dataset with the torchcodec backend and
no image transforms never calls torchvision, so :func:`install` puts a stand-in in its place when
the real one cannot be imported; anything that does reach it raises.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def install() -> bool:
    """Import torchvision, or register the stand-in; True when the stand-in is in use."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA-only wheel fails in many ways, or there is none
        print("torchvision unavailable: an inert stand-in is used (lerobot needs it only for image "
              "transforms and its pyav video backend)", file=sys.stderr)
    else:
        return False
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    class Transform:  # lerobot.datasets.transforms subclasses it
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stand-in: image transforms are not available")

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: torchvision's video backends are not available "
                           "(decode with torchcodec)")

    tv, transforms = _module("torchvision"), _module("torchvision.transforms")
    v2, functional = _module("torchvision.transforms.v2"), _module("torchvision.transforms.v2.functional")
    v2.Transform, v2.functional = Transform, functional
    transforms.v2 = v2
    tv.transforms, tv.__version__, tv.set_video_backend = transforms, "0.0-stand-in", unavailable
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.v2": v2, "torchvision.transforms.v2.functional": functional})
    return True
