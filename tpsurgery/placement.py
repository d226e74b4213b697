"""Where inputs go for a model on one device, split over several (``device_map``), or with offloaded weights.

A model loaded with ``device_map="auto"`` (accelerate) has its modules on several devices, and offloaded modules keep
their weights on the ``meta`` device until they run; accelerate's hooks move each module's inputs to its execution
device. ``next(model.parameters()).device`` is therefore not where inputs belong: they go to the device the token
embedding runs on (the first module a forward touches), and every later move is accelerate's. Reads come back to the
caller's CPU as float32 (the embedder does that for every backend).

>>> from tpsurgery.testing import tiny_model
>>> input_device(tiny_model("llama")[0])
device(type='cpu')
"""

from __future__ import annotations

from typing import Any

import torch

from .arch import ArchSpec, arch_for, get_path
from .errors import ModelError


def _hook_device(module: Any) -> torch.device | None:
    """The execution device of accelerate's alignment hook on ``module`` (None: no hook or no device set)."""
    hook = module.__dict__.get("_hf_hook")
    device = getattr(hook, "execution_device", None)
    if device is None:  # a SequentialHook chains several; the first one with a device decides
        device = next((h.execution_device for h in getattr(hook, "hooks", ())
                       if getattr(h, "execution_device", None) is not None), None)
    if device is None:
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def input_device(model: Any, spec: ArchSpec | None = None) -> torch.device:
    """The device of the token embedding: accelerate's execution device if a hook places it (on the embedding or an
    enclosing module), else its weight's device.

    Raises :class:`ModelError` for weights on the ``meta`` device that no hook will load (nothing could run).
    """
    spec = spec or arch_for(model)
    parts = spec.embed.split(".")
    for k in range(len(parts), -1, -1):  # the embedding itself, then each enclosing module up to the model
        device = _hook_device(get_path(model, ".".join(parts[:k])) if k else model)
        if device is not None:
            return device
    weight = get_path(model, spec.embed).weight
    if weight.device.type == "meta":
        raise ModelError(f"the token embedding `{spec.embed}` has its weights on the meta device and no accelerate "
                         "hook loads them: load the model with weights (from_pretrained, or device_map= to offload)")
    return weight.device
