"""ZSAD methods: one module per method, one contract (images -> scores [B], maps [B, H, W])."""
from .base import (
    AnomalyMethod,
    MethodConfig,
    MethodError,
    MethodOutput,
    build_method,
    build_method_or_tiny,
    get_method_class,
    list_methods,
    register_method,
)
from . import _load_all  # noqa: F401  (registers the built-in methods)

__all__ = [
    "AnomalyMethod",
    "MethodConfig",
    "MethodError",
    "MethodOutput",
    "build_method",
    "build_method_or_tiny",
    "get_method_class",
    "list_methods",
    "register_method",
]
