"""Shared helpers of the PyTorch-reference tests (``test_*_torchref.py``, ``test_latent_models.py``).

* :func:`import_reference` imports torch and the reference packages (deepinv, diffusers, ...) through
  ``torchvision_shim``'s shim, and applies the one rule for a missing reference: a module-level skip, except when
  the environment variable ``MAPREPS_REQUIRE_TORCHREF`` is set to a non-empty value other than ``0`` (``.ci/run``
  sets it): then it is an ``ImportError`` at collection, so CI cannot pass with the reference tests skipped.
* :func:`randomize` / :func:`random_tensor` give every parameter of a reference module a random value with O(1)
  activations, so that no layer is zero or an identity (the references zero-initialise some output layers, which
  would make an equivalence test vacuous).
* :func:`nchw` / :func:`nhwc` convert between the JAX side's NHWC numpy arrays and torch's NCHW tensors.
* :func:`rel_err` is the error measure of the equivalence tests, ``max |a - b| / max |b|``.
* :func:`capture_block_outputs` runs a reference forward pass and records the outputs of chosen sub-modules
  (forward hooks), to localise a mismatch to a block.

torch is imported inside the functions, so this module imports without it (and the test modules can skip).
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from torchvision_shim import install_torchvision_shim

REQUIRE_ENV = "MAPREPS_REQUIRE_TORCHREF"


def reference_required() -> bool:
    """Whether a missing reference is an error (``MAPREPS_REQUIRE_TORCHREF`` non-empty and not ``0``)."""
    return os.environ.get(REQUIRE_ENV, "0") not in ("", "0")


def import_reference(*extra_modules: str):
    """``(torch, *modules)``: torch, then each of ``extra_modules`` (dotted names, e.g. ``"deepinv"``,
    ``"diffusers"``, ``"safetensors.numpy"``) imported after :func:`install_torchvision_shim`.

    Call it at the top of a test module. When any of them fails to import (``ImportError``), the module is skipped
    (``pytest.skip(..., allow_module_level=True)``), or, with :func:`reference_required`, an ``ImportError`` is raised
    so that collection fails.
    """
    import pytest

    try:
        import torch

        install_torchvision_shim()
        modules = tuple(importlib.import_module(name) for name in extra_modules)
    except ImportError as e:
        what = ", ".join(("torch",) + extra_modules)
        if reference_required():
            raise ImportError(f"{REQUIRE_ENV} is set but the PyTorch reference ({what}) is not importable ({e}); "
                              f"install it with `bash .ci/install_torchref.sh`") from None
        pytest.skip(f"PyTorch reference ({what}) not installed ({e})", allow_module_level=True)
    return (torch, *modules)


def random_tensor(name: str, shape, generator, unit_normal=()):
    """A random float32 value for the parameter ``name`` of ``shape``, from ``z ~ N(0, 1)`` drawn with the torch
    ``generator``: 1-D parameters ``1 + 0.1 z`` when the name ends with ``weight`` (norm scales) and ``0.1 z``
    otherwise (biases); others ``z / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``. Names ending with one of the
    suffixes ``unit_normal`` get ``z`` itself (e.g. ``("embedding.weight",)`` for a VQ codebook)."""
    import torch

    if isinstance(unit_normal, str):
        unit_normal = (unit_normal,)
    shape = tuple(shape)
    z = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith(tuple(unit_normal)):
        return z
    if len(shape) == 1:
        return 1.0 + 0.1 * z if name.endswith("weight") else 0.1 * z
    return z / np.sqrt(int(np.prod(shape[1:])))


def randomize(net, seed: int, unit_normal=()):
    """Overwrite every parameter of the torch module ``net`` (in ``named_parameters`` order, one generator seeded with
    ``seed``) with :func:`random_tensor`; returns ``net`` (its train/eval mode unchanged)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(random_tensor(name, p.shape, g, unit_normal))
    return net


def nchw(x):
    """An NHWC array (numpy or anything ``np.asarray`` takes, e.g. a JAX array) as a contiguous NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
    """An NCHW torch tensor as an NHWC numpy array (detached; a view of the tensor's memory, not a copy)."""
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def rel_err(a, b, dtype=None) -> float:
    """``max |a - b| / max |b|`` (the denominator floored at 1e-30), computed in the arrays' own dtype, or in
    ``dtype`` when given (both are cast first, e.g. ``np.float64`` to take the difference without rounding)."""
    a, b = np.asarray(a, dtype), np.asarray(b, dtype)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def capture_block_outputs(blocks, call):
    """``(call(), feats)``: ``call()`` run under ``torch.no_grad()`` with a forward hook on each module of ``blocks``
    (``{name: module}``); ``feats[name]`` is an NHWC numpy copy of that module's output (of its first element when
    the output is a tuple). The hooks are removed afterwards, also on an error."""
    import torch

    feats = {}

    def hook(name):
        def f(_module, _inputs, out):
            feats[name] = nhwc(out[0] if isinstance(out, tuple) else out).copy()
        return f

    hooks = [m.register_forward_hook(hook(name)) for name, m in blocks.items()]
    try:
        with torch.no_grad():
            out = call()
    finally:
        for h in hooks:
            h.remove()
    return out, feats


def diffusers_autoencoder(diffusers, cfg):
    """The diffusers ``AutoencoderKL`` (``cfg.kind == "kl"``) or ``VQModel`` of a
    :class:`~mapreps_jax.networks.autoencoder.AutoencoderConfig` (``eval()``, diffusers' own initialisation)."""
    n = len(cfg.block_out_channels)
    kw = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=cfg.block_out_channels,
              layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
              norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor,
              down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
              mid_block_add_attention=cfg.mid_block_add_attention)
    if cfg.kind == "kl":
        return diffusers.AutoencoderKL(**kw).eval()
    return diffusers.VQModel(num_vq_embeddings=cfg.num_vq_embeddings, vq_embed_dim=cfg.vq_embed_dim, **kw).eval()
