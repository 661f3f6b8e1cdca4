"""A small CNN digit classifier (32x32x1 digits in [-1, 1]) whose penultimate features define digit-FD.

Architecture (no batch norm, no dropout: a pure function of ``params`` and the input)::

    x [B, 32, 32, 1] -> conv3x3(32) relu -> conv3x3(32) relu -> maxpool2      16x16x32
                     -> conv3x3(64) relu -> conv3x3(64) relu -> maxpool2      8x8x64
                     -> flatten                                                4096
                     -> dense(128) relu          = penultimate features  [B, 128]
                     -> dense(10)                = logits                [B, 10]

``features`` and ``logits`` take the parameter pytree (as saved in ``checkpoints/default/classifier``) and an
NHWC float32 batch; they do not need the training code (``scripts/train_classifier.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["DigitClassifier", "FEATURE_DIM", "N_CLASSES", "IMAGE_SHAPE", "init_classifier_params", "features",
           "logits", "features_and_logits"]

FEATURE_DIM = 128
N_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)


class DigitClassifier(nn.Module):
    """CNN digit classifier; ``__call__`` returns ``(features [B, 128], logits [B, 10])``."""

    widths: tuple = (32, 64)
    feature_dim: int = FEATURE_DIM
    num_classes: int = N_CLASSES

    @nn.compact
    def __call__(self, x):
        h = x
        for i, w in enumerate(self.widths):
            h = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}a")(h))
            h = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}b")(h))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = h.reshape(h.shape[0], -1)
        f = nn.relu(nn.Dense(self.feature_dim, name="fc")(h))
        return f, nn.Dense(self.num_classes, name="head")(f)


def init_classifier_params(key):
    """Random parameters (Flax default initialisation)."""
    return DigitClassifier().init(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))["params"]


def _check(x):
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"x: expected images of shape [B, 32, 32, 1] (NHWC), got {tuple(x.shape)}")


def features_and_logits(params, x):
    """``(penultimate features [B, 128] (post-ReLU), logits [B, 10])`` of images ``x`` ``[B, 32, 32, 1]`` in
    ``[-1, 1]``."""
    x = jnp.asarray(x, jnp.float32)
    _check(x)
    return DigitClassifier().apply({"params": params}, x)


def features(params, x) -> jax.Array:
    """Penultimate (128-d, post-ReLU) features of images ``[B, 32, 32, 1]`` in ``[-1, 1]``."""
    return features_and_logits(params, x)[0]


def logits(params, x) -> jax.Array:
    """Class logits ``[B, 10]`` of images ``[B, 32, 32, 1]`` in ``[-1, 1]``."""
    return features_and_logits(params, x)[1]
