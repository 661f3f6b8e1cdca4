"""Counting network calls inside the networks (the NFE tests): a ``jax.debug.callback`` in the UNet's ``apply`` and
in a latent space's encoder and decoder reports every executed evaluation with its batch, so a count is what ran,
not what a formula says (``tests/test_nfe_counted.py``, ``tests/test_resample.py``, ``tests/test_latent_methods.py``).
"""

import dataclasses

import jax
import numpy as np

import mapreps_jax as mr


class Counter:
    """Rows seen by a callback (``calls``: callback invocations); ``per_image()`` divides by the batch ``B``."""

    def __init__(self, batch: int):
        self.batch = batch
        self.rows = 0
        self.calls = 0

    def __call__(self, x):
        self.rows += int(np.shape(x)[0])
        self.calls += 1

    def per_image(self):
        jax.effects_barrier()
        assert self.rows % self.batch == 0, (self.rows, self.batch)
        return self.rows // self.batch

    def reset(self):
        jax.effects_barrier()
        self.rows = self.calls = 0


def counting_model(model, batch: int):
    """``model`` whose ``apply`` reports every executed evaluation (with its batch) to the returned counter."""
    counter = Counter(batch)
    inner = model.apply

    def apply(params, x_t, t, cond=None):
        jax.debug.callback(counter, x_t)
        return inner(params, x_t, t, cond)

    return dataclasses.replace(model, apply=apply), counter


def counting_latent_model(model, batch: int, encode_fn=None, decode_fn=None, params=None):
    """A latent model whose UNet, decoder and encoder each report to a counter: ``(model, (unet, dec, enc))``. The
    encoder and decoder are ``model.space``'s unless ``encode_fn`` / ``decode_fn`` (and ``params``) are given (e.g. to
    put a pixel-space model into a latent space)."""
    counted, unet = counting_model(model, batch)
    dec, enc = Counter(batch), Counter(batch)
    space = model.space
    enc_fn = encode_fn if encode_fn is not None else space.encode_fn
    dec_fn = decode_fn if decode_fn is not None else space.decode_fn

    def encode(p, x, key=None):
        jax.debug.callback(enc, x)
        return enc_fn(p, x, key)

    def decode(p, z):
        jax.debug.callback(dec, z)
        return dec_fn(p, z)

    p = params if params is not None else space.params
    name = space.name if space.name != "pixel" else "latent"
    return dataclasses.replace(counted, space=mr.latent_space(p, encode, decode, name=name)), (unet, dec, enc)


def counted(counters) -> dict:
    """``{"unet", "decoder", "encoder"}`` per image from the three counters of :func:`counting_latent_model`."""
    unet, dec, enc = counters
    return {"unet": unet.per_image(), "decoder": dec.per_image(), "encoder": enc.per_image()}
