"""Load score networks by name (``adm-ffhq256``, ``adm-imagenet256``, ...) or by path.

The registry is a dict ``name -> ModelEntry`` (config factory, sub-directory under the checkpoints directory, and
how to obtain the weights); :func:`register_model` adds entries (e.g. the library's bundled default model).

The checkpoints directory (the *checkpoint root*) is, in order: the ``checkpoints_dir`` argument,
``$MAPREPS_CHECKPOINTS``, ``./checkpoints``. ``$MAPREPS_CHECKPOINTS`` means the same in
:mod:`mapreps_jax.checkpoint_io`: the root that holds ``default/`` (the bundled digits prior) and the converted model
folders (``<root>/adm-ffhq256``, ...). A root that does not exist is reported as such.

The diffusion schedule of a loaded model is the one recorded in its ``meta.json`` (``schedule``: kind, ``T`` and
parameters, written by :func:`~mapreps_jax.networks.convert.save_converted`); checkpoints converted before that
field existed get the linear 1000-step schedule. A registered model whose checkpoint records another schedule than
its registry entry is refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional

from .adm import ADMConfig, adm_score_model
from .convert import load_converted
from ..diffusion import make_schedule
from ..model import ScoreModel

__all__ = ["ModelEntry", "ModelNotFoundError", "register_model", "registered_models", "load_model",
           "default_checkpoints_dir"]


class ModelNotFoundError(FileNotFoundError):
    """A registered model's converted checkpoint is absent (the message says how to obtain and convert it)."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes:
      config: zero-argument factory of the :class:`ADMConfig`.
      subdir: directory (under the checkpoints directory) of the converted checkpoint.
      how_to_obtain: human instructions printed when the checkpoint is absent.
      schedule: ``make_schedule`` kind of the model's training schedule.
      source_sha256: expected SHA-256 of the source file (``None`` when not published).
      loader: optional ``loader(path, entry) -> ScoreModel`` overriding the ADM loader.
    """

    config: Callable[[], ADMConfig]
    subdir: str
    how_to_obtain: str
    schedule: str = "linear"
    source_sha256: Optional[str] = None
    loader: Optional[Callable] = None


def _convert_hint(preset, src, subdir):
    return (f"  mapreps convert adm --config {preset} --src {src} --dst checkpoints/{subdir}\n"
            f"(or from Python: mapreps_jax.networks.convert_command(['adm', '--config', '{preset}', '--src', "
            f"'{src}', '--dst', 'checkpoints/{subdir}'])). See checkpoints/README.md.")


_REGISTRY: Dict[str, ModelEntry] = {
    "adm-ffhq256": ModelEntry(
        config=ADMConfig.ffhq256,
        subdir="adm-ffhq256",
        how_to_obtain=(
            "Download 'ffhq_10m.pt' (the FFHQ 256x256 unconditional ADM of Chung et al., 'Diffusion Posterior "
            "Sampling', ICLR 2023) from the checkpoint link in the DPS authors' repository "
            "(github.com/DPS2022/diffusion-posterior-sampling, README 'Download pretrained checkpoint'), then "
            "convert it once (no torch needed):\n" + _convert_hint("ffhq256", "ffhq_10m.pt", "adm-ffhq256")),
    ),
    "adm-imagenet256": ModelEntry(
        config=ADMConfig.imagenet256,
        subdir="adm-imagenet256",
        how_to_obtain=(
            "Download '256x256_diffusion_uncond.pt' (ImageNet 256x256 unconditional) from the model list of "
            "openai/guided-diffusion (github.com/openai/guided-diffusion, README 'Download pre-trained models'), "
            "then convert it once (no torch needed):\n"
            + _convert_hint("imagenet256", "256x256_diffusion_uncond.pt", "adm-imagenet256")),
    ),
}


def _latent_loader(path, entry, dtype=None, remat=None):
    from .latent import load_latent

    return load_latent(path, dtype=dtype, remat=remat, name=os.path.basename(path.rstrip("/")))


def _latent_hint(kind, src, subdir, extra=""):
    return (f"  mapreps convert {kind} --src {src}{extra} --dst checkpoints/{subdir}\n"
            f"(no torch needed). See checkpoints/README.md.")


_REGISTRY["sd15"] = ModelEntry(
    config=lambda: None, subdir="sd15", schedule="scaled_linear", loader=_latent_loader,
    how_to_obtain=("Download Stable Diffusion v1.5 in the diffusers layout (the 'vae/' and 'unet/' folders with "
                   "config.json and diffusion_pytorch_model.safetensors, and 'scheduler/scheduler_config.json', from "
                   "the model card of stable-diffusion-v1-5 on the Hugging Face hub), then convert it once:\n"
                   + _latent_hint("sd", "SD15_FOLDER", "sd15")))
_REGISTRY["ldm-ffhq256"] = ModelEntry(
    config=lambda: None, subdir="ldm-ffhq256", schedule="ldm_linear", loader=_latent_loader,
    how_to_obtain=("Download the CompVis latent-diffusion FFHQ-256 model ('ffhq-ldm-vq-4', model.ckpt, linked from "
                   "the 'Pretrained LDMs' table of github.com/CompVis/latent-diffusion), then convert it once:\n"
                   + _latent_hint("ldm-ffhq", "model.ckpt", "ldm-ffhq256", " --ema")))


def register_model(name: str, config: Callable[[], ADMConfig], subdir: str, how_to_obtain: str,
                   schedule: str = "linear", source_sha256: Optional[str] = None,
                   loader: Optional[Callable] = None, overwrite: bool = False) -> None:
    """Add a model to the registry (``overwrite`` to replace an existing name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_model: {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = ModelEntry(config=config, subdir=subdir, how_to_obtain=how_to_obtain, schedule=schedule,
                                 source_sha256=source_sha256, loader=loader)


def registered_models() -> Dict[str, ModelEntry]:
    """A copy of the registry."""
    return dict(_REGISTRY)


def default_checkpoints_dir() -> str:
    """``$MAPREPS_CHECKPOINTS`` (the checkpoint root) when set, else ``./checkpoints`` (absolute path)."""
    return os.path.abspath(os.environ.get("MAPREPS_CHECKPOINTS") or os.path.join(os.getcwd(), "checkpoints"))


def _schedule(meta: dict, path: str):
    from ..checkpoint_io import schedule_from_metadata

    return schedule_from_metadata({"schedule": meta["schedule"]} if "schedule" in meta else {},
                                  where=f"{path}/meta.json")


def load_model(name_or_path, checkpoints_dir=None, dtype: Optional[str] = None, remat: Optional[bool] = None,
               verify: bool = True, sharding=None) -> ScoreModel:
    """A :class:`~mapreps_jax.model.ScoreModel` from a registered name or a converted-checkpoint directory.

    Args:
      name_or_path: a registered name (:func:`registered_models`) or the path of a directory written by
        :func:`~mapreps_jax.networks.convert.save_converted`.
      checkpoints_dir: where registered models live (default :func:`default_checkpoints_dir`).
      dtype: override the compute dtype (``"float32"`` / ``"bfloat16"``).
      remat: override rematerialisation (``jax.checkpoint`` of every block).
      verify: check the params checksum recorded at conversion.
      sharding: place every parameter with it (``jax.device_put``; e.g.
        ``mapreps_jax.sharding.replicated_sharding(mesh)`` for data-parallel restoration); default: as loaded.

    Raises:
      ModelNotFoundError: a registered model's checkpoint (or the checkpoint root) is absent; the message says
        where to download the source file and the exact convert command.
      ValueError: unknown name, or a corrupt / mismatched checkpoint.
    """
    model = _load_model(name_or_path, checkpoints_dir, dtype, remat, verify)
    if sharding is None:
        return model
    from ..sharding import place

    return place(model, sharding)


def _load_model(name_or_path, checkpoints_dir, dtype, remat, verify) -> ScoreModel:
    name = os.fspath(name_or_path)
    overrides = {k: v for k, v in (("dtype", dtype), ("remat", remat)) if v is not None}
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        env = os.environ.get("MAPREPS_CHECKPOINTS")
        root = os.fspath(checkpoints_dir) if checkpoints_dir is not None else default_checkpoints_dir()
        if not os.path.isdir(root):
            origin = ("checkpoints_dir" if checkpoints_dir is not None
                      else f"MAPREPS_CHECKPOINTS={env!r}" if env else "the default checkpoint root")
            raise ModelNotFoundError(f"model {name!r}: {origin}: no such folder {root} (the checkpoint root must "
                                     f"hold the converted model folders, e.g. {entry.subdir}/).\n"
                                     f"{entry.how_to_obtain}")
        path = os.path.join(root, entry.subdir)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            raise ModelNotFoundError(f"model {name!r}: no converted checkpoint at {path}.\n{entry.how_to_obtain}")
        if entry.loader is not None:
            return entry.loader(path, entry, **overrides)
        config = dataclasses.replace(entry.config(), **overrides)
        params, config, meta = load_converted(path, expected_config=config,
                                              expected_source_sha256=entry.source_sha256, verify=verify)
        expected = make_schedule(entry.schedule)
        if "schedule" in meta:
            schedule, record = _schedule(meta, path)
            if record["kind"] != entry.schedule or schedule.T != expected.T or not bool(
                    (schedule.betas == expected.betas).all()):
                raise ValueError(f"{path}: the checkpoint records the diffusion schedule {record}, but model "
                                 f"{name!r} is registered with the {entry.schedule!r} schedule (T={expected.T})")
        return adm_score_model(config, params, expected, name=name)
    if os.path.isdir(name):
        from .latent import is_latent_checkpoint, load_latent

        if is_latent_checkpoint(name):
            return load_latent(name, verify=verify, dtype=dtype, remat=remat,
                               name=os.path.basename(name.rstrip("/")))
        params, config, meta = load_converted(name, verify=verify)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        schedule, _ = _schedule(meta, name)
        return adm_score_model(config, params, schedule, name=os.path.basename(name.rstrip("/")))
    raise ValueError(f"load_model: {name!r} is neither a registered model ({', '.join(sorted(_REGISTRY))}) nor a "
                     f"directory")
