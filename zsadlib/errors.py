"""Exception types shared by the layers of zsadlib (kept here so that low modules need not import methods/)."""
from __future__ import annotations

__all__ = ["MethodError"]


class MethodError(ValueError):
    """Unknown method or a bad option of one."""
