"""Device and precision handling shared by the engines (evaluate, train, predict) and the methods.

Imports only torch: methods and engines import this module, never the other way round.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["PRECISIONS", "Precision", "COMPILE_MODES", "autocast", "compiled", "resolve_device", "available_devices",
           "check_device"]

PRECISIONS = ("fp32", "bf16", "fp16")
Precision = str


# torch.compile modes (``True`` = "default"); compiling is an option for CUDA users, never required
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compiled(module: torch.nn.Module, mode: bool | str = False, backend: str = "inductor") -> torch.nn.Module:
    """``module`` itself (``mode`` False) or ``torch.compile(module, mode=..., backend=...)``.

    The compiled wrapper forwards attribute reads (``.backbone``, ``.name``, ``.config``) to the module and shares its
    parameters, so the engines use it in place of the method. Python-side work (text caches, class-name filtering)
    becomes graph breaks, not errors. The first batch pays the compilation (a minute or more), so it pays off on long
    evaluations on CUDA; on the CPU inductor needs a C++ compiler.
    """
    if mode is False or mode is None:
        return module
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES} (or True/False), not {mode!r}")
    return torch.compile(module, mode=mode, backend=backend)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision = "fp32") -> Iterator[None]:
    """Reduced precision behind one switch: ``"fp32"`` (off), ``"bf16"`` (CPU and CUDA), ``"fp16"`` (CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        yield
        return
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs CUDA; on the CPU use 'bf16'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, then ``cuda:0`` ... and ``mps`` where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device`` for ``device`` when this machine has it; ValueError naming the available ones if not."""
    available = available_devices()
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; available: auto, {', '.join(available)}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (resolved.index is None or resolved.index < count):
            return resolved
    elif resolved.type == "mps" and "mps" in available:
        return resolved
    raise ValueError(f"device {str(device)!r} is not available on this machine; available: auto, "
                     f"{', '.join(available)}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else must be a device this machine has
    (ValueError naming the available ones otherwise)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)
