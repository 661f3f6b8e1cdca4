"""The dictionary form shared by the networks' frozen config dataclasses (:class:`~mapreps_jax.networks.adm.ADMConfig`,
:class:`~mapreps_jax.networks.sd_unet.SDUNetConfig`, :class:`~mapreps_jax.networks.autoencoder.AutoencoderConfig`):
the JSON form stored beside converted weights, and the architecture fields a checkpoint is checked against."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["DictConfig"]


class DictConfig:
    """Mixin of a frozen config dataclass: :meth:`to_dict` / :meth:`from_dict` and :meth:`architecture_dict`.

    ``NON_ARCHITECTURE`` names the fields that change how the network computes but not its parameters or function
    (left out of :meth:`architecture_dict`)."""

    NON_ARCHITECTURE: tuple = ("dtype", "remat")

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The config of :meth:`to_dict`'s dict (fields left out take their defaults); an unknown field is a
        ``ValueError`` naming it and the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown} (known: {sorted(names)})")
        return cls(**dict(d))

    def architecture_dict(self) -> dict:
        """The fields that determine the parameters and the function: :meth:`to_dict` without
        ``NON_ARCHITECTURE``."""
        d = self.to_dict()
        for k in self.NON_ARCHITECTURE:
            d.pop(k)
        return d
