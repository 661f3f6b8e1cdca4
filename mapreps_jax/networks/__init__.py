"""Score networks: the guided-diffusion (ADM) UNet in Flax, a torch-free checkpoint reader, the converter from
PyTorch state dicts and a by-name model registry."""

from .adm import (ADMConfig, ADMUNet, adm_apply, adm_score_model, count_params, init_adm_params, param_shapes,
                  timestep_embedding)
from .torch_pickle import load_torch_state_dict, load_state_dict
from .convert import (convert_adm_state_dict, flax_to_torch_state_dict, expected_torch_shapes, save_converted,
                      load_converted, convert_command, sha256_file, read_manifest)
from .registry import load_model, register_model, registered_models, ModelNotFoundError

__all__ = [
    "ADMConfig", "ADMUNet", "adm_apply", "adm_score_model", "count_params", "init_adm_params", "param_shapes",
    "timestep_embedding", "load_torch_state_dict", "load_state_dict", "convert_adm_state_dict",
    "flax_to_torch_state_dict", "expected_torch_shapes", "save_converted", "load_converted", "convert_command",
    "sha256_file", "read_manifest", "load_model", "register_model", "registered_models", "ModelNotFoundError",
]
