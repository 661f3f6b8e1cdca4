#!/usr/bin/env bash
# Optional PyTorch reference for the network-equivalence tests (tests/test_adm_torchref.py).
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); deepinv and torchvision are
# installed without their dependencies for the same reason (tests/torchvision_shim.py registers the two missing
# torchvision op schemas before deepinv is imported).
set -euo pipefail
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps deepinv==0.5.0 torchvision==0.28.0 torchmetrics==1.9.0
python -m pip install -q einops h5py natsort requests lightning-utilities safetensors
