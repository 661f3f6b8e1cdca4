"""Test-only shim: make PyPI ``torchvision`` (and so ``deepinv``) importable beside the CPU-only torch wheel.

The PyPI torchvision wheel's compiled ops library does not load against the ``+cpu`` torch build, so its
``torchvision::nms`` / ``torchvision::qnms`` operators are never defined, and ``torchvision/_meta_registrations.py``
fails at import when it registers fake kernels for them. Defining the two schemas first (no kernels: calling them
raises) lets the import succeed; the tests use nothing from torchvision. Call :func:`install_torchvision_shim` after
``import torch`` and before ``import deepinv`` / ``import diffusers``; the tests do it through
``tests/torch_reference.py``'s ``import_reference``, which also skips (or, when required, fails) on a missing
reference.
"""

from __future__ import annotations

_LIB = None  # keep the torch.library.Library alive (its definitions vanish when it is collected)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def install_torchvision_shim():
    """Define placeholder schemas for torchvision's custom ops that are missing (idempotent)."""
    global _LIB
    import torch

    missing = [n for n in _SCHEMAS if not _op_exists(torch, n)]
    if not missing:
        return
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _op_exists(torch, name) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key is not None and bool(
            torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))
    except Exception:
        return False

