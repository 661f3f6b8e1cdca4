"""Flax networks: the guided-diffusion (ADM) UNet (also the LDM-FFHQ latent UNet), the Stable Diffusion UNet, the
first-stage autoencoders (SD AutoencoderKL, LDM VQ-f4), latent models (network + autoencoder), a torch-free
checkpoint reader, strict converters from PyTorch state dicts and a by-name model registry."""

from .adm import (ADMConfig, ADMUNet, adm_apply, adm_score_model, count_params, init_adm_params, param_shapes,
                  timestep_embedding)
from .torch_pickle import load_torch_state_dict, load_state_dict
from .convert import (convert_adm_state_dict, flax_to_torch_state_dict, expected_torch_shapes, save_converted,
                      load_converted, convert_command, sha256_file, read_manifest)
from .registry import load_model, register_model, registered_models, ModelNotFoundError
from .sd_unet import SDUNetConfig, init_sd_unet_params, sd_unet_apply, convert_diffusers_unet
from .autoencoder import (AutoencoderConfig, init_autoencoder_params, autoencoder_encode, autoencoder_decode,
                          convert_diffusers_autoencoder, convert_compvis_first_stage)
from .latent import latent_score_model, load_latent, save_latent

__all__ = [
    "ADMConfig", "ADMUNet", "adm_apply", "adm_score_model", "count_params", "init_adm_params", "param_shapes",
    "timestep_embedding", "load_torch_state_dict", "load_state_dict", "convert_adm_state_dict",
    "flax_to_torch_state_dict", "expected_torch_shapes", "save_converted", "load_converted", "convert_command",
    "sha256_file", "read_manifest", "load_model", "register_model", "registered_models", "ModelNotFoundError",
    "SDUNetConfig", "init_sd_unet_params", "sd_unet_apply", "convert_diffusers_unet", "AutoencoderConfig",
    "init_autoencoder_params", "autoencoder_encode", "autoencoder_decode", "convert_diffusers_autoencoder",
    "convert_compvis_first_stage", "latent_score_model", "load_latent", "save_latent",
]
