"""One config convention (:mod:`mapreps_jax.config`): every hyper-parameter config is a frozen dataclass whose
numeric fields are pytree leaves and whose ``static`` fields (and string options) are not."""

import dataclasses

import jax
import pytest

import mapreps_jax as mr
from mapreps_jax.config import pytree_config, static

CONFIGS = [mr.MAPConfig(), mr.MAPConfig(w=0.3), mr.REDDiffConfig(), mr.DPSStep(), mr.DDPMStep(), mr.DDNMStep(),
           mr.PiGDMStep(), mr.DMPSStep()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_leaves_are_the_numeric_fields_and_round_trip(cfg):
    fields = dataclasses.fields(cfg)
    numeric = [f.name for f in fields if not f.metadata.get("static")
               and getattr(cfg, f.name) is not None and not isinstance(getattr(cfg, f.name), str)]
    leaves, treedef = jax.tree_util.tree_flatten(cfg)
    assert len(leaves) == len(numeric)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back == cfg
    # a new value of a leaf does not change the tree structure (no recompilation); a static field does
    if numeric:
        changed = dataclasses.replace(cfg, **{numeric[0]: 0.123})
        assert jax.tree_util.tree_structure(changed) == treedef
    statics = [f.name for f in fields if f.metadata.get("static")]
    assert statics, "every config has at least one static option"


def test_string_option_in_a_leaf_field_is_static():
    auto = mr.MAPConfig(w="auto")
    assert "auto" not in jax.tree_util.tree_leaves(auto)
    assert jax.tree_util.tree_structure(auto) != jax.tree_util.tree_structure(mr.MAPConfig(w=0.3))
    assert jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(auto), jax.tree_util.tree_leaves(auto)).w == "auto"


def test_jit_takes_a_config_as_an_argument_and_grad_flows_through_leaves():
    @pytree_config
    class Toy:
        a: float = 1.0
        n: int = static(3)

    traces = {"n": 0}

    @jax.jit
    def f(c, x):
        traces["n"] += 1
        return c.a * x ** c.n

    f(Toy(a=2.0), 1.5)
    f(Toy(a=3.0), 1.5)
    assert traces["n"] == 1
    f(Toy(a=3.0, n=2), 1.5)
    assert traces["n"] == 2
    assert float(jax.grad(lambda a: f(Toy(a=a), 2.0))(1.0)) == pytest.approx(8.0)


# each network config and the fields that do not change its parameters or function (left out of the architecture)
NETWORK_CONFIGS = [(mr.networks.adm.ADMConfig.ffhq256(), {"dtype", "remat", "dropout"}),
                   (mr.networks.sd_unet.SDUNetConfig(), {"dtype", "remat"}),
                   (mr.networks.autoencoder.AutoencoderConfig(), {"dtype", "remat"})]


@pytest.mark.parametrize("cfg,not_architecture", NETWORK_CONFIGS, ids=lambda c: type(c).__name__)
def test_network_config_dict_form(cfg, not_architecture):
    """The networks' configs share one dict form (``networks/config_dict.py``): JSON round trip to an equal, equally
    hashed config; tuples as lists; the architecture dict leaves out exactly the class's non-architecture fields;
    an unknown field is refused with the class's name and the field."""
    import json

    d = cfg.to_dict()
    assert not any(isinstance(v, tuple) for v in d.values())
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg and hash(back) == hash(cfg)
    arch = cfg.architecture_dict()
    assert set(d) - set(arch) == not_architecture
    assert dataclasses.replace(cfg, remat=not cfg.remat).architecture_dict() == arch
    with pytest.raises(ValueError, match=rf"{type(cfg).__name__}\.from_dict: unknown fields \['bogus'\]"):
        type(cfg).from_dict({**d, "bogus": 1})
