"""The one convention for hyper-parameter configs: frozen dataclasses that are pytrees.

    @pytree_config
    class MyConfig:
        lr: Any = 0.1                      # a leaf: traceable (grad / vmap / jit argument)
        n_steps: int = static(100)         # static: part of the compiled function's identity

Numbers (and arrays) in ordinary fields are leaves, so ``jax.grad`` / ``jax.vmap`` over a config work and a jitted
algorithm takes the config as an argument without retracing for new values. Fields made with :func:`static` are
auxiliary data (hashable; a new value compiles a new function). A leaf field may also hold a string option (such
as ``MAPConfig.w = "auto"``): a string is never a leaf, it is kept with the static data of that instance.

Every config of the library (:class:`~mapreps_jax.map_stage.MAPConfig`, the step rules of
:mod:`~mapreps_jax.samplers`, :class:`~mapreps_jax.baselines.REDDiffConfig`) is declared this way.
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["pytree_config", "static"]


def static(default=dataclasses.MISSING, **kwargs):
    """A static (non-traced) config field."""
    return dataclasses.field(default=default, metadata=dict(static=True), **kwargs)


def pytree_config(cls):
    """Make ``cls`` a frozen dataclass registered as a pytree (see module doc)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    leaf_names = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static_names = tuple(f.name for f in fields if f.metadata.get("static", False))

    def flatten(obj):
        vals = [getattr(obj, n) for n in leaf_names]
        strings = tuple((n, v) for n, v in zip(leaf_names, vals) if isinstance(v, str))
        leaves = [None if isinstance(v, str) else v for v in vals]
        return leaves, (tuple(getattr(obj, n) for n in static_names), strings)

    def unflatten(aux, leaves):
        static_vals, strings = aux
        obj = object.__new__(cls)  # no __post_init__: leaves may be tracers or placeholders
        for n, v in zip(leaf_names, leaves):
            object.__setattr__(obj, n, v)
        for n, v in strings:
            object.__setattr__(obj, n, v)
        for n, v in zip(static_names, static_vals):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls
