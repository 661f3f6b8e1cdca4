"""Benchmark (not a library feature): would Winograd convolutions make the ADM's 3x3 convolutions faster on XLA:CPU?

The FFHQ ADM's forward + VJP at 0.7x deepinv's time (issue 17) needs more FLOP/s than the same-run matmul chain
(README, "Benchmarks"); the one way past that bound is to do fewer FLOPs. Winograd's minimal filtering
``F(m x m, 3 x 3)`` computes an ``m x m`` output tile from an ``(m + 2) x (m + 2)`` input tile as

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise; summed over input channels as a matrix product)

so a stride-1, 'SAME' 3x3 convolution becomes ``(m + 2)^2`` independent matrix products ``[tiles, C_in] x [C_in,
C_out]`` between transformed input tiles ``V`` and transformed kernels ``U``: 2.25x fewer multiplications for
``F(2, 3)``, 4x for ``F(4, 3)`` (Lavin & Gray 2016's matrices). Here it is written in plain JAX (slices, adds and one
batched ``dot_general``), so XLA:CPU computes the transforms as separate memory-bound loops around the products; the
kernels' transform ``U`` is computed outside the timed function (a sampler's weights do not change between steps, so
this is Winograd's best case). Compared, per convolution shape of the FFHQ-256 ADM (batch 1) and the bundled digits
ADM (batch 64), medians of interleaved repetitions:

* ``forward``: the direct convolution (``mapreps_jax.networks.conv``, XLA's Eigen path) vs ``F(2, 3)`` and
  ``F(4, 3)``;
* ``input_vjp``: the cotangent with respect to the input (what the DPS step needs; the convolution is linear in
  its input, so no forward is recomputed), the library's explicit input-gradient convolution vs autodiff through
  the Winograd form;
* ``rel_err``: ``max |Winograd - direct| / max |direct|`` of the forward outputs (float32; ``F(4, 3)``'s larger
  transform coefficients cost accuracy).

``--parts ffhq`` times the whole FFHQ-256 ADM (random weights, batch 1; section ``ffhq_network`` of the file): its
forward and forward + input VJP with every 3x3 stride-1 convolution through ``F(m, 3)`` (kernels transformed inside
the program, as a drop-in convolution must; the input gradient as the Winograd convolution of the flipped,
in/out-swapped kernel, the kernel gradient by the direct rule) against the library's direct convolutions, their
output difference, and the time of the kernel transforms alone (what precomputed Winograd-domain weights would save).

Writes ``benchmarks/results/winograd_cpu.json``.

    python benchmarks/bench_winograd.py [--parts shapes,ffhq] [--reps 5] [--m 4] [--ffhq-reps 3] [--out PATH]

Each part writes its own entries of the file (``shapes`` the top level, ``ffhq`` the section), atomically, keeping
the other part's.
"""
import argparse
import contextlib
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (command_line, finish_result, machine_info, matmul_reference, read_json,  # noqa: E402
                     time_interleaved)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mapreps_jax.networks.conv as conv_module  # noqa: E402
from mapreps_jax.networks.conv import conv_general_dilated  # noqa: E402

_DN = ("NHWC", "HWIO", "NHWC")

# Lavin & Gray (2016): B^T (input tile), G (kernel), A^T (output tile), for m = 2 and m = 4.
WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)),
}
#: (height = width, C_in, C_out, batch): one 3x3 convolution per level of each network
SHAPES = {"ffhq": [(256, 128, 128, 1), (128, 128, 128, 1), (64, 256, 256, 1), (32, 256, 256, 1),
                   (16, 512, 512, 1), (8, 512, 512, 1)],
          "digits": [(32, 32, 32, 64), (16, 64, 64, 64), (8, 64, 64, 64)]}


def _combine(coeffs, arrays):
    """``[sum_j coeffs[i, j] arrays[j] for each row i]`` with the zero terms left out (the transforms are sparse)."""
    out = []
    for row in coeffs:
        terms = [a if c == 1 else -a if c == -1 else float(c) * a for c, a in zip(row, arrays) if c != 0]
        acc = terms[0]
        for t in terms[1:]:
            acc = acc + t
        out.append(acc)
    return out


def kernel_transform(w, m):
    """``U = G g G^T`` for every (C_in, C_out) pair: ``[(m + 2)^2, C_in, C_out]`` from an HWIO ``[3, 3, C_in,
    C_out]`` kernel."""
    g = WINOGRAD[m][1].astype(np.float32)
    u = jnp.einsum("ai,ijco,bj->abco", g, w, g)
    return u.reshape((m + 2) ** 2, w.shape[2], w.shape[3])


def winograd_conv(x, u, m):
    """Stride-1 3x3 'SAME' convolution of NHWC ``x`` with the transformed kernels ``u`` by ``F(m x m, 3 x 3)``."""
    bt, _, at = WINOGRAD[m]
    a = m + 2
    b, h, w, _ = x.shape
    th, tw = -(-h // m), -(-w // m)
    xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
    rows = _combine(bt, [xp[:, i:i + m * (th - 1) + 1:m] for i in range(a)])          # B^T d, by rows
    v = [t for r in rows for t in _combine(bt, [r[:, :, j:j + m * (tw - 1) + 1:m] for j in range(a)])]  # (B^T d) B
    v = jnp.stack(v).reshape(a * a, b * th * tw, x.shape[-1])
    prod = jnp.einsum("kpc,kco->kpo", v, u).reshape(a, a, b, th, tw, u.shape[-1])
    cols = _combine(at, [prod[i] for i in range(a)])                                   # A^T M
    y = jnp.stack([jnp.stack(_combine(at, [r[j] for j in range(a)])) for r in cols])   # (A^T M) A
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, m * th, m * tw, -1)
    return y[:, :h, :w]


def direct_conv(x, w):
    return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd_layer(x, w, m):
    return winograd_conv(x, kernel_transform(w, m), m)


def _winograd_layer_fwd(x, w, m):
    return _winograd_layer(x, w, m), (x, w)


def _winograd_layer_bwd(m, res, g):
    x, w = res
    dx = winograd_conv(g, kernel_transform(jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3), m), m)
    # the kernel gradient by the plain XLA convolution (not through the module's swapped ``_conv``)
    _, pull_w = jax.vjp(lambda ww: jax.lax.conv_general_dilated(x, ww, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN),
                        w)
    return dx, pull_w(g)[0]


_winograd_layer.defvjp(_winograd_layer_fwd, _winograd_layer_bwd)


@contextlib.contextmanager
def winograd_convolutions(m):
    """Within the block, programs traced through ``mapreps_jax.networks.conv`` run their 3x3 stride-1 'SAME'
    convolutions by ``F(m, 3)`` (the module's ``_conv`` swapped; JAX's caches cleared on entry and exit)."""
    direct = conv_module._conv

    def conv(x, w, strides, padding, precision):
        if w.shape[:2] == (3, 3) and tuple(strides) == (1, 1) and tuple(padding) == ((1, 1), (1, 1)):
            return _winograd_layer(x, w, m)
        return direct(x, w, strides, padding, precision)

    jax.clear_caches()
    conv_module._conv = conv
    try:
        yield
    finally:
        conv_module._conv = direct
        jax.clear_caches()


def ffhq_network(m, reps):
    """The whole FFHQ-256 ADM, direct vs ``F(m, 3)`` convolutions (module docstring), deepinv beside them where it
    imports."""
    import time

    from _common import import_torch_reference, torch_fwd_vjp, torch_info
    from torch_reference import nchw

    from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params

    cfg = ADMConfig.ffhq256()
    params = init_adm_params(jax.random.PRNGKey(0), cfg)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 256, 256, 3)).astype(np.float32)
    g_np = rng.standard_normal((1, 256, 256, 6)).astype(np.float32)
    x, g, t = jnp.asarray(x_np), jnp.asarray(g_np), jnp.array([500.0])

    def vjp(p, x, g):
        out, pull = jax.vjp(lambda xx: adm_apply(cfg, p, xx, t), x)
        return out, pull(g)[0]

    cands, outs, res = {}, {}, {"m": m, "compile_s": {}}
    for mode in ("direct", f"F({m},3)"):
        with winograd_convolutions(m) if mode != "direct" else contextlib.nullcontext():
            for kind, fn, args in (("forward", lambda p, x: adm_apply(cfg, p, x, t), (params, x)),
                                   ("forward_vjp", vjp, (params, x, g))):
                t0 = time.perf_counter()
                exe = jax.jit(fn).lower(*args).compile()
                res["compile_s"][f"{kind} {mode}"] = time.perf_counter() - t0
                outs[f"{kind} {mode}"] = jax.block_until_ready(exe(*args))
                cands[f"{kind} {mode}"] = lambda exe=exe, args=args: jax.block_until_ready(exe(*args))
    ref_fwd, ref_dx = np.asarray(outs["forward direct"]), np.asarray(outs["forward_vjp direct"][1])
    res["rel_err"] = {"forward": float(np.abs(np.asarray(outs[f"forward F({m},3)"]) - ref_fwd).max()
                                       / np.abs(ref_fwd).max()),
                      "input_vjp": float(np.abs(np.asarray(outs[f"forward_vjp F({m},3)"][1]) - ref_dx).max()
                                         / np.abs(ref_dx).max())}
    if max(res["rel_err"].values()) > 1e-4:
        raise AssertionError(f"the Winograd network differs from the direct one: {res['rel_err']}")
    ws = [w for w in jax.tree_util.tree_leaves(params) if w.ndim == 4 and w.shape[:2] == (3, 3)]
    res["conv3x3_weights"] = int(sum(w.size for w in ws))
    transform = jax.jit(lambda ws: [kernel_transform(w, m) for w in ws])
    cands["kernel_transforms"] = lambda: jax.block_until_ready(transform(ws))
    ref = import_torch_reference("deepinv")
    if ref is not None:
        torch, deepinv = ref
        net = deepinv.models.DiffUNet(in_channels=3, out_channels=3, large_model=False, pretrained=None).eval()
        tt = torch.tensor([500.0])
        cands.update(torch_fwd_vjp(lambda xr: net.forward_diffusion(xr, tt), nchw(x_np), nchw(g_np), {}))
        res["torch"] = torch_info(torch, deepinv)
    med = time_interleaved(cands, reps)["medians"]
    res["seconds"] = med
    res["winograd_over_direct"] = {k: med[f"{k} F({m},3)"] / med[f"{k} direct"] for k in ("forward", "forward_vjp")}
    if "torch_float32_forward" in med:
        res["over_torch"] = {f"{k} {mode}": med[f"{k} {mode}"] / med[f"torch_float32_{k}"]
                             for k in ("forward", "forward_vjp") for mode in ("direct", f"F({m},3)")}
    print("FFHQ network:", {k: v for k, v in res.items() if k != "seconds"}, flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parts", default="shapes", help="comma-separated: shapes (one convolution per shape), ffhq "
                   "(the whole FFHQ-256 ADM, section ffhq_network)")
    p.add_argument("--m", type=int, default=4, choices=sorted(WINOGRAD), help="output tile of the ffhq part's F(m, 3)")
    p.add_argument("--ffhq-reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "winograd_cpu.json"))
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))
    if parts - {"shapes", "ffhq"}:
        p.error(f"--parts: expected shapes and/or ffhq, got {a.parts!r}")
    if "shapes" in parts:
        shapes_part(a, argv)
    if "ffhq" in parts:
        res = {"command": command_line(argv), **machine_info(), **ffhq_network(a.m, a.ffhq_reps)}
        finish_result(res, a.out, section="ffhq_network")


def shapes_part(a, argv):
    res = {"command": command_line(argv), **machine_info(), "shapes": {}}
    mm, mm_args, mm_flops = matmul_reference()
    for net, shapes in SHAPES.items():
        for h, cin, cout, batch in shapes:
            kx, kw, kg = jax.random.split(jax.random.PRNGKey(h * cin), 3)
            x = jax.random.normal(kx, (batch, h, h, cin))
            w = jax.random.normal(kw, (3, 3, cin, cout)) / np.sqrt(9 * cin)
            g = jax.random.normal(kg, (batch, h, h, cout))
            us = {m: kernel_transform(w, m).block_until_ready() for m in WINOGRAD}
            fwd = {"direct": (jax.jit(direct_conv), w)}
            fwd.update({f"F({m},3)": (jax.jit(lambda x, u, m=m: winograd_conv(x, u, m)), us[m]) for m in WINOGRAD})
            ref = np.asarray(fwd["direct"][0](x, w))
            rel = {k: float(np.abs(np.asarray(f(x, k2)) - ref).max() / np.abs(ref).max())
                   for k, (f, k2) in fwd.items() if k != "direct"}
            if max(rel.values()) > 1e-4:  # a wrong transform is off by O(1), float32 rounding by ~1e-5
                raise AssertionError(f"Winograd differs from the direct convolution at {h}x{h} {cin}->{cout}: {rel}")
            vjp = {k: jax.jit(lambda x, k2, g, f=f: jax.vjp(lambda xx: f(xx, k2), x)[1](g)[0])
                   for k, (f, _) in fwd.items()}
            cands = {}
            for k, (f, k2) in fwd.items():
                cands[f"forward {k}"] = lambda f=f, k2=k2: f(x, k2).block_until_ready()
                cands[f"input_vjp {k}"] = lambda f=vjp[k], k2=k2: f(x, k2, g).block_until_ready()
            t = time_interleaved(cands, a.reps)["medians"]
            flops = 2.0 * 9 * batch * h * h * cin * cout
            entry = {"net": net, "batch": batch, "direct_gflop": flops / 1e9, "rel_err": rel, "seconds": t,
                     "over_direct": {k: t[k] / t[k.split(" ")[0] + " direct"] for k in t if not k.endswith("direct")},
                     "direct_gflop_per_s": {k: flops / 1e9 / t[k + " direct"] for k in ("forward", "input_vjp")}}
            res["shapes"][f"{net} {h}x{h} {cin}->{cout} batch {batch}"] = entry
            print(f"{net} {h} {cin}->{cout}: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry["over_direct"].items())
                  + f"; rel_err {rel}", flush=True)
    t = time_interleaved({"matmul": lambda: mm(*mm_args).block_until_ready()}, a.reps)["medians"]["matmul"]
    res["matmul_reference_gflop_per_s"] = mm_flops / 1e9 / t
    # the FFHQ ADM's levels together, one convolution of each (sum of the times): the levels' whole effect
    ffhq = [e for e in res["shapes"].values() if e["net"] == "ffhq"]
    res["ffhq_levels_summed_over_direct"] = {
        k: sum(e["seconds"][k] for e in ffhq) / sum(e["seconds"][k.split(" ")[0] + " direct"] for e in ffhq)
        for k in ffhq[0]["over_direct"]}
    print("FFHQ levels summed:", res["ffhq_levels_summed_over_direct"], flush=True)
    network = read_json(a.out).get("ffhq_network")  # the other part's section, kept
    finish_result(dict(res, **({"ffhq_network": network} if network else {})), a.out)


if __name__ == "__main__":
    main()
