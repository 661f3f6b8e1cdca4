"""Latent diffusion models: a score network on latents composed with its first-stage autoencoder.

A latent model is a :class:`~mapreps_jax.model.ScoreModel` whose ``space`` is the autoencoder
(:func:`~mapreps_jax.space.latent_space`): ``m.encode(x, key=None) -> z`` (posterior mean without a key, a sample
with one; times the latent scale factor), ``m.decode(z) -> x`` ([-1, 1] images), and on latents the usual
``m.eps(z, t, cond)``, ``m.alpha_bar(t)``, ``m.schedule``; classifier-free guidance is ``m.guided(cond, s, uncond)``
(``eps_u + s (eps_c - eps_u)``). Every algorithm of the library then runs on latents (LMAP-RPS, Latent-DPS, ...).

Two backbones:

* **Stable Diffusion 1.5**: :class:`~mapreps_jax.networks.sd_unet.SDUNetConfig` UNet (text cross-attention; ``cond``
  a text embedding ``[L, 768]`` or ``[B, L, 768]`` of any length ``L``), the ``AutoencoderKL`` (scale 0.18215), the
  scaled-linear schedule (``beta`` from 0.00085 to 0.012, linear in ``sqrt(beta)``), epsilon prediction.
* **CompVis LDM FFHQ-256** (``ffhq-ldm-vq-4``): the ADM UNet of :mod:`~mapreps_jax.networks.adm`
  (:meth:`ADMConfig.ldm_ffhq256`; ``cond`` ignored), the VQ-f4 first stage (decode quantises with a straight-through
  gradient; scale 1.0), the LDM linear schedule (``beta`` from 0.0015 to 0.0195, linear in ``sqrt(beta)``).

A converted latent checkpoint is a folder (written atomically by
:func:`~mapreps_jax.networks.convert.write_checkpoint`)::

    <dst>/meta.json   {"format": "mapreps-latent", "version": 1, "kind": "sd15" | "ldm-ffhq" | ...,
                       "unet": {"arch": "sd-unet" | "adm", "config": {...}},
                       "autoencoder": {"config": {...}}, "schedule": {"kind", "T", "params"},
                       "prediction_type": "epsilon", "sources": {file: sha256}, "ema": bool | null,
                       "params_sha256", "num_params", "num_tensors", "files": {...}}
    <dst>/params/     orbax: {"unet": ..., "autoencoder": ...}

:func:`load_latent` (and :func:`mapreps_jax.load_model` on such a folder) checks every file's SHA-256, the configs,
the parameter tree and the params checksum, and restores the schedule from the metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from ..diffusion import make_schedule
from ..integrity import sha256_file
from ..model import ScoreModel
from ..space import latent_space
from .adm import ADMConfig, _ADMApply, param_shapes as adm_param_shapes
from .autoencoder import (AutoencoderConfig, autoencoder_decode, autoencoder_encode, autoencoder_param_shapes,
                          convert_compvis_first_stage, convert_diffusers_autoencoder)
from .convert import check_replaceable, convert_adm_state_dict, read_meta, restore_checkpoint, write_checkpoint
from .sd_unet import SDUNetConfig, convert_diffusers_unet, sd_unet_apply, sd_unet_param_shapes

__all__ = ["latent_score_model", "save_latent", "load_latent", "is_latent_checkpoint", "convert_sd_folder",
           "convert_ldm_checkpoint", "convert_latent_command", "LATENT_FORMAT", "LDM_FFHQ_SCHEDULE",
           "SD15_SCHEDULE"]

LATENT_FORMAT = "mapreps-latent"
LATENT_VERSION = 1
SD15_SCHEDULE = {"kind": "scaled_linear", "T": 1000, "params": {"beta_start": 0.00085, "beta_end": 0.012}}
LDM_FFHQ_SCHEDULE = {"kind": "ldm_linear", "T": 1000, "params": {"beta_start": 0.0015, "beta_end": 0.0195}}
_ARCHS = {"adm": ADMConfig, "sd-unet": SDUNetConfig}


# ------------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _Encode:
    config: AutoencoderConfig

    def __call__(self, params, x, key=None):
        return autoencoder_encode(self.config, params, x, key)


@dataclasses.dataclass(frozen=True)
class _Decode:
    config: AutoencoderConfig

    def __call__(self, params, z):
        return autoencoder_decode(self.config, params, z)


@dataclasses.dataclass(frozen=True)
class _SDApply:
    """``apply(params, z, t, cond) -> eps`` of the text-conditioned UNet (hashable: equal configs do not retrace)."""

    config: SDUNetConfig

    def __call__(self, params, z, t, cond=None):
        if cond is None:
            raise ValueError("the Stable Diffusion UNet needs a text embedding: pass cond=[L, 768] (or [B, L, 768]; "
                             "the empty prompt's embedding for an unconditional model), or use "
                             "model.guided(cond, scale, uncond)")
        return sd_unet_apply(self.config, params, z, t, cond)


def _arch(unet_config) -> str:
    for name, cls in _ARCHS.items():
        if isinstance(unet_config, cls):
            return name
    raise TypeError(f"latent model: unet_config must be an ADMConfig or an SDUNetConfig, got "
                    f"{type(unet_config).__name__}")


def latent_score_model(unet_config, unet_params, ae_config: AutoencoderConfig, ae_params, schedule,
                       name: str = "latent") -> ScoreModel:
    """A :class:`~mapreps_jax.model.ScoreModel` on latents whose space is the autoencoder (see module doc)."""
    arch = _arch(unet_config)
    if not isinstance(ae_config, AutoencoderConfig):
        raise TypeError(f"latent_score_model: ae_config must be an AutoencoderConfig, got {type(ae_config).__name__}")
    apply = _ADMApply(unet_config) if arch == "adm" else _SDApply(unet_config)
    learned = bool(getattr(unet_config, "learn_sigma", False))
    space = latent_space(ae_params, _Encode(ae_config), _Decode(ae_config), name=f"{name}-latent")
    return ScoreModel(params=unet_params, schedule=schedule, apply=apply, learned_variance=learned, name=name,
                      space=space)


def _unet_shapes(unet_config):
    return adm_param_shapes(unet_config) if _arch(unet_config) == "adm" else sd_unet_param_shapes(unet_config)


def _check_tree(params, abstract, what):
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
    if got != want:
        raise ValueError(f"{what}: params do not match the config's parameter tree")


# ------------------------------------------------------------------------------------------------- save / load


def save_latent(dst, *, kind: str, unet_config, unet_params, ae_config: AutoencoderConfig, ae_params,
                schedule: dict, sources: Optional[Dict[str, str]] = None, ema: Optional[bool] = None,
                overwrite: bool = False, prediction_type: str = "epsilon") -> str:
    """Write a latent checkpoint folder (see module doc); returns its absolute path."""
    from ..checkpoint_io import schedule_metadata

    if prediction_type != "epsilon":
        raise ValueError(f"save_latent: only epsilon-prediction models are supported, got {prediction_type!r}")
    dst = check_replaceable(dst, overwrite)
    record = schedule_metadata(schedule["kind"], schedule.get("T", 1000), **(schedule.get("params") or {}))
    _check_tree(unet_params, _unet_shapes(unet_config), "save_latent (unet)")
    _check_tree(ae_params, autoencoder_param_shapes(ae_config), "save_latent (autoencoder)")
    meta = {"format": LATENT_FORMAT, "version": LATENT_VERSION, "kind": str(kind),
            "unet": {"arch": _arch(unet_config), "config": unet_config.to_dict()},
            "autoencoder": {"config": ae_config.to_dict()}, "schedule": record,
            "prediction_type": prediction_type, "sources": dict(sources or {}), "ema": ema}
    return write_checkpoint(dst, {"unet": unet_params, "autoencoder": ae_params}, meta, overwrite)


def is_latent_checkpoint(path) -> bool:
    try:
        with open(os.path.join(os.fspath(path), "meta.json")) as f:
            return json.load(f).get("format") == LATENT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_latent_meta(path: str) -> dict:
    meta = read_meta(path, LATENT_FORMAT, LATENT_VERSION, ("unet", "autoencoder", "schedule", "params_sha256"))
    if meta.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{path}: prediction type {meta['prediction_type']!r}; only epsilon is supported")
    return meta


def load_latent(path, verify: bool = True, dtype: Optional[str] = None, remat: Optional[bool] = None,
                name: Optional[str] = None) -> ScoreModel:
    """The latent :class:`~mapreps_jax.model.ScoreModel` of a folder written by :func:`save_latent` (or
    ``mapreps convert sd | ldm-ffhq``). ``dtype`` / ``remat`` override both networks' compute options."""
    from ..checkpoint_io import schedule_from_metadata

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted latent checkpoint not found: {path}")
    meta = _read_latent_meta(path)
    overrides = {k: v for k, v in (("dtype", dtype), ("remat", remat)) if v is not None}
    try:
        arch = meta["unet"]["arch"]
        if arch not in _ARCHS:
            raise ValueError(f"unknown UNet architecture {arch!r} (expected one of {sorted(_ARCHS)})")
        unet_config = dataclasses.replace(_ARCHS[arch].from_dict(meta["unet"]["config"]), **overrides)
        ae_config = dataclasses.replace(AutoencoderConfig.from_dict(meta["autoencoder"]["config"]), **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid config in meta.json ({e})") from e
    schedule, _ = schedule_from_metadata(meta, where=f"{path}/meta.json")
    abstract = {"unet": _unet_shapes(unet_config), "autoencoder": autoencoder_param_shapes(ae_config)}
    params = restore_checkpoint(path, abstract, meta, verify)
    return latent_score_model(unet_config, params["unet"], ae_config, params["autoencoder"], schedule,
                              name=name or meta.get("kind") or os.path.basename(path))


# ------------------------------------------------------------------------------------------------- conversion


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: {path} is not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return d


def _weights_file(folder: str, what: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{what}: no diffusion_pytorch_model.safetensors or .bin in {folder}")


def _sd_schedule(src: str) -> dict:
    """The schedule of a diffusers folder (``scheduler/scheduler_config.json``; SD 1.5's when absent)."""
    p = os.path.join(src, "scheduler", "scheduler_config.json")
    if not os.path.isfile(p):
        return dict(SD15_SCHEDULE)
    sc = _read_json(p, "scheduler config")
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear"}
    bs = sc.get("beta_schedule", "scaled_linear")
    if bs not in kinds:
        raise ValueError(f"{p}: beta_schedule {bs!r} is not supported (expected one of {sorted(kinds)})")
    pred = sc.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"{p}: prediction_type {pred!r}; only epsilon-prediction models are supported")
    return {"kind": kinds[bs], "T": int(sc.get("num_train_timesteps", 1000)),
            "params": {"beta_start": float(sc.get("beta_start", 0.00085)),
                       "beta_end": float(sc.get("beta_end", 0.012))}}


def convert_sd_folder(src, progress=print) -> dict:
    """Convert a diffusers-layout Stable Diffusion folder (``vae/`` and ``unet/`` with ``config.json`` and
    safetensors or ``.bin`` weights; ``scheduler/scheduler_config.json`` when present), strictly. Returns the
    keyword arguments of :func:`save_latent` (less ``dst``)."""
    from .torch_pickle import load_state_dict

    src = os.fspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src: not a folder: {src} (expected a diffusers layout with vae/ and unet/)")
    out: Dict[str, Any] = {"kind": "sd15", "sources": {}}
    for sub in ("vae", "unet"):
        folder = os.path.join(src, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--src: {src} has no {sub}/ folder (expected a diffusers layout)")
        cfg_dict = _read_json(os.path.join(folder, "config.json"), f"{sub} config")
        wfile = _weights_file(folder, sub)
        progress(f"  {sub}: hashing {wfile} ...")
        out["sources"][f"{sub}/{os.path.basename(wfile)}"] = sha256_file(wfile)
        progress(f"  {sub}: reading and converting ...")
        sd = load_state_dict(wfile)
        if sub == "vae":
            cfg = AutoencoderConfig.from_diffusers(cfg_dict, "kl")
            out["ae_config"], out["ae_params"] = cfg, convert_diffusers_autoencoder(sd, cfg)
        else:
            cfg = SDUNetConfig.from_diffusers(cfg_dict)
            out["unet_config"], out["unet_params"] = cfg, convert_diffusers_unet(sd, cfg)
        del sd
    out["schedule"] = _sd_schedule(src)
    return out


_LDM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor", "lvlb_weights",
                "model_ema.decay", "model_ema.num_updates")


def convert_ldm_checkpoint(sd: Dict[str, np.ndarray], unet_config: ADMConfig, ae_config: AutoencoderConfig,
                           schedule: dict, ema: bool = False) -> Tuple[dict, dict]:
    """``(unet_params, ae_params)`` from a CompVis latent-diffusion state dict, strictly.

    ``model.diffusion_model.*`` (or, with ``ema``, the ``model_ema.*`` copies, whose names are the model's with
    the dots removed) go to the ADM UNet; ``first_stage_model.*`` to the autoencoder. The schedule buffers
    (``betas``, ``alphas_cumprod``, ...) are checked against ``schedule`` when present; every other key is an error.
    """
    unet_sd: Dict[str, np.ndarray] = {}
    ae_sd: Dict[str, np.ndarray] = {}
    ema_sd: Dict[str, np.ndarray] = {}
    unknown = []
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            unet_sd[k[len("model.diffusion_model."):]] = v
        elif k.startswith("first_stage_model."):
            ae_sd[k[len("first_stage_model."):]] = v
        elif k.startswith("model_ema.") and k not in _LDM_BUFFERS:
            ema_sd[k[len("model_ema."):]] = v
        elif k not in _LDM_BUFFERS:
            unknown.append(k)
    if unknown:
        raise ValueError(f"latent-diffusion checkpoint: unexpected keys (not the UNet, the first stage, the EMA "
                         f"copy or the schedule buffers): {', '.join(sorted(unknown)[:8])}"
                         f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)} in all)")
    if not unet_sd:
        raise ValueError("latent-diffusion checkpoint: no model.diffusion_model.* keys (not a CompVis LDM state dict)")
    if not ae_sd:
        raise ValueError("latent-diffusion checkpoint: no first_stage_model.* keys (the autoencoder is missing)")
    if ema:
        if not ema_sd:
            raise ValueError("--ema: the checkpoint has no model_ema.* weights")
        by_flat = {("diffusion_model" + k).replace(".", ""): k for k in unet_sd}
        missing = sorted(set(by_flat) - set(ema_sd))
        extra = sorted(set(ema_sd) - set(by_flat))
        if missing or extra:
            raise ValueError(f"--ema: the model_ema.* weights do not match the UNet's keys (missing: "
                             f"{missing[:5]}, unexpected: {extra[:5]})")
        unet_sd = {by_flat[k]: v for k, v in ema_sd.items()}
    if "alphas_cumprod" in sd:
        ours = np.asarray(make_schedule(schedule["kind"], T=schedule["T"], **schedule["params"]).alpha_bars)
        theirs = np.asarray(sd["alphas_cumprod"], np.float64)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
            raise ValueError(f"latent-diffusion checkpoint: its alphas_cumprod (shape {theirs.shape}) is not the "
                             f"{schedule['kind']} schedule {schedule['params']} with T={schedule['T']}")
    return convert_adm_state_dict(unet_sd, unet_config), convert_compvis_first_stage(ae_sd, ae_config)


def _ldm_configs(arg: Optional[str]) -> Tuple[ADMConfig, AutoencoderConfig, dict]:
    if arg is None:
        return ADMConfig.ldm_ffhq256(), AutoencoderConfig.ldm_vq_f4(), dict(LDM_FFHQ_SCHEDULE)
    d = _read_json(arg, "--config")
    unknown = sorted(set(d) - {"unet", "autoencoder", "schedule"})
    if unknown or "unet" not in d or "autoencoder" not in d:
        raise ValueError(f"--config {arg}: expected an object with 'unet' (ADMConfig fields), 'autoencoder' "
                         f"(AutoencoderConfig fields) and optionally 'schedule'; got keys {sorted(d)}")
    return (ADMConfig.from_dict(d["unet"]), AutoencoderConfig.from_dict(d["autoencoder"]),
            d.get("schedule", dict(LDM_FFHQ_SCHEDULE)))


def _parser(kind: str):
    if kind == "sd":
        p = argparse.ArgumentParser(prog="mapreps convert sd",
                                    description="Convert a diffusers-layout Stable Diffusion 1.x folder (vae/, unet/) "
                                                "to a mapreps-jax latent checkpoint, without torch.")
        p.add_argument("--src", required=True, help="the diffusers folder (vae/ and unet/ with config.json and "
                                                    "diffusion_pytorch_model.safetensors or .bin)")
    else:
        p = argparse.ArgumentParser(prog="mapreps convert ldm-ffhq",
                                    description="Convert the CompVis LDM FFHQ-256 checkpoint (ffhq-ldm-vq-4 "
                                                "model.ckpt) to a mapreps-jax latent checkpoint, without torch.")
        p.add_argument("--src", required=True, help="the CompVis model.ckpt (torch.save zip; read by the restricted "
                                                    "unpickler, no code executed)")
        p.add_argument("--ema", action="store_true", help="take the EMA weights (model_ema.*)")
        p.add_argument("--config", default=None, help="JSON {unet: ADMConfig fields, autoencoder: AutoencoderConfig "
                                                      "fields[, schedule]} instead of the FFHQ-256 presets")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst that is a converted checkpoint (or an empty folder)")
    return p


def convert_latent_command(kind: str, argv) -> int:
    """``mapreps convert sd|ldm-ffhq ...``; returns the exit status (0 done, 2 input error, 1 out of memory)."""
    from .torch_pickle import load_state_dict

    args = _parser(kind).parse_args(list(argv))
    prog = f"mapreps convert {kind}"
    try:
        check_replaceable(args.dst, args.overwrite)
        if kind == "sd":
            print(f"[1/2] converting {args.src} ...", flush=True)
            kw = convert_sd_folder(args.src, progress=lambda m: print(m, flush=True))
            ema = None
        else:
            unet_config, ae_config, schedule = _ldm_configs(args.config)
            if not os.path.isfile(args.src):
                raise FileNotFoundError(f"--src: file not found: {args.src}")
            print(f"[1/2] hashing and reading {args.src} (restricted unpickler) ...", flush=True)
            digest = sha256_file(args.src)
            sd = load_state_dict(args.src)
            print(f"      {len(sd)} tensors; converting{' (EMA weights)' if args.ema else ''} ...", flush=True)
            unet_params, ae_params = convert_ldm_checkpoint(sd, unet_config, ae_config, schedule, ema=args.ema)
            del sd
            kw = dict(kind="ldm-ffhq", unet_config=unet_config, unet_params=unet_params, ae_config=ae_config,
                      ae_params=ae_params, schedule=schedule, sources={os.path.basename(args.src): digest})
            ema = bool(args.ema)
        print(f"[2/2] saving to {args.dst} ...", flush=True)
        out = save_latent(args.dst, ema=ema, overwrite=args.overwrite, **kw)
        n = sum(a.size for a in jax.tree_util.tree_leaves((kw["unet_params"], kw["ae_params"])))
        print(f"done: {out} ({n / 1e6:.1f}M parameters)", flush=True)
        return 0
    except (ValueError, OSError, NotImplementedError, pickle.UnpicklingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory while converting {args.src}", file=sys.stderr)
        return 1
