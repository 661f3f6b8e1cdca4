"""The digits application's bundled models (``<checkpoint root>/default/``): the diffusion prior and the digit
classifier, and the writer of the bundled layout (:func:`save_prior`). The layout and the integrity checks are
described in :mod:`mapreps_jax.checkpoint_io`."""

from __future__ import annotations

import json
import os
from typing import Optional

from ..checkpoint_io import (bundle_dir, check_param_tree, read_json, restore_pytree, save_pytree,
                             schedule_from_metadata, schedule_metadata, write_manifest, write_text_atomic)

__all__ = ["load_classifier", "load_default_prior_config", "load_default_prior", "load_default_latent", "save_prior", "jax_tree_to_jnp"]


def load_classifier(path: Optional[str] = None):
    """Parameters of the bundled digit classifier (``<checkpoints>/classifier``), a pytree of NumPy arrays for
    :func:`mapreps_jax.app.classifier.logits` / ``features``."""
    import jax

    from .classifier import init_classifier_params

    path = os.path.abspath(path) if path else os.path.join(bundle_dir(), "classifier")
    tree = restore_pytree(path)
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"classifier checkpoint at {path!r}: expected key 'params', got "
                         f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    check_param_tree(tree["params"], jax.eval_shape(init_classifier_params, jax.random.PRNGKey(0)),
                     f"classifier checkpoint {path}")
    return tree["params"]


def load_default_prior_config(path: Optional[str] = None) -> dict:
    """``config.json`` of the bundled diffusion prior (``adm`` config dict, ``schedule``, training settings)."""
    root = bundle_dir(path)
    return read_json(os.path.join(root, "config.json"))


def load_default_prior(path: Optional[str] = None, name: str = "digits-adm", sharding=None):
    """The bundled digits prior as a :class:`~mapreps_jax.model.ScoreModel` (EMA weights, epsilon prediction,
    the schedule recorded in ``config.json``: linear, 1000 steps): images ``[B, 32, 32, 1]`` in ``[-1, 1]``.

    Args:
      path: checkpoint folder holding ``config.json`` and ``diffusion/`` (default
        :func:`~mapreps_jax.checkpoint_io.default_checkpoint_dir`).
      sharding: where the parameters go (e.g. ``mapreps_jax.sharding.replicated_sharding(mesh)``: a copy on every
        device, sent from the host directly); default: JAX's default device.

    Raises:
      FileNotFoundError: no such folder (or ``$MAPREPS_CHECKPOINTS`` names a missing folder).
      ValueError: a damaged checkpoint (checksum, size, missing/extra file; see
        :func:`~mapreps_jax.checkpoint_io.verify_checkpoint_files`), an invalid ``config.json`` or schedule, or
        parameters that do not match the ADM config (named).
    """
    from ..networks.adm import ADMConfig, adm_score_model, param_shapes

    root = bundle_dir(path)
    cfg = load_default_prior_config(root)
    cfg_path = os.path.join(root, "config.json")
    if not isinstance(cfg.get("adm"), dict):
        raise ValueError(f"{cfg_path}: expected an 'adm' object (the network config)")
    try:
        config = ADMConfig.from_dict(cfg["adm"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid 'adm' config ({e})") from e
    schedule, _ = schedule_from_metadata(cfg, where=cfg_path)
    diff_dir = os.path.join(root, "diffusion")
    tree = restore_pytree(diff_dir)
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{diff_dir}: expected a pytree with key 'params'")
    check_param_tree(tree["params"], param_shapes(config), f"diffusion checkpoint {diff_dir}")
    params = jax_tree_to_jnp(tree["params"], sharding)
    return adm_score_model(config, params, schedule, name=name)


def load_default_latent(path: Optional[str] = None, sharding=None):
    """The bundled latent digits model (``checkpoints/default/latent``: KL autoencoder 32x32x1 <-> 8x8x4 and a latent
    epsilon-UNet, ``checkpoints/default/latent.json``) as a latent :class:`~mapreps_jax.model.ScoreModel`; ``path``
    is the bundle folder holding ``latent/`` (default :func:`~mapreps_jax.checkpoint_io.default_checkpoint_dir`);
    ``sharding`` as :func:`load_default_prior`. Errors as :func:`~mapreps_jax.networks.registry.load_model` (a damaged or missing checkpoint is named)."""
    from ..networks.registry import load_model

    return load_model(os.path.join(bundle_dir(path), "latent"), sharding=sharding)


def save_prior(root: str, params, config, schedule: Optional[dict] = None, extra_config: Optional[dict] = None,
               info: Optional[dict] = None) -> None:
    """Write a diffusion prior in the bundled layout: ``root/diffusion/`` (atomic; ``info.json``) and
    ``root/config.json`` with the ADM config and the schedule record (``schedule`` from
    :func:`~mapreps_jax.checkpoint_io.schedule_metadata`, default linear 1000 steps, stored as ``schedule`` kind, ``T`` and ``schedule_params`` so that older readers
    still see the kind), then refresh ``checksums.json``. :func:`load_default_prior` reads it back."""
    from ..networks.adm import param_shapes

    record = schedule or schedule_metadata()
    record = schedule_metadata(record["kind"], record["T"], **record.get("params", {}))
    check_param_tree(params, param_shapes(config), "save_prior: params")
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    save_pytree(os.path.join(root, "diffusion"), {"params": params},
                extra_files={"info.json": json.dumps(info or {}, indent=2) + "\n"})
    cfg = dict(extra_config or {})
    cfg.update({"adm": config.to_dict(), "schedule": record["kind"], "T": record["T"],
                "schedule_params": record["params"]})
    write_text_atomic(os.path.join(root, "config.json"), json.dumps(cfg, indent=2) + "\n")
    write_manifest(root)


def jax_tree_to_jnp(tree, sharding=None):
    """Host arrays to ``jax.Array``: on the default device, or placed with ``sharding`` (``jax.device_put``)."""
    import jax
    import jax.numpy as jnp

    if sharding is not None:
        from ..sharding import place

        return place(tree, sharding)
    return jax.tree_util.tree_map(jnp.asarray, tree)
