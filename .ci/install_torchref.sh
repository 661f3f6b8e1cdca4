#!/usr/bin/env bash
# Installs the optional PyTorch reference (filled in by the ADM issue).
exit 1
