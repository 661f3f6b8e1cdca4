"""Forward operators: one parametrised matrix over every (task, configuration), plus per-task references.

Every numerical comparison runs in float64 (``jax.enable_x64(True)`` around building and applying) against an
independent reference: the inner-product identity, ``jax.linear_transpose``, ``numpy.linalg.pinv`` of the dense
matrix, ``np.fft``, a direct circular convolution, ``scipy.linalg.hadamard``, PIL's bicubic resize.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import jax
import jax.numpy as jnp

from mapreps_jax.operators import (DEFAULT_PINV_RCOND, TASKS, bicubic_matrix, fwht, gaussian_kernel,
                                   make_operator, motion_kernel)

_rng = np.random.default_rng(1234)
USER_MASK = (_rng.uniform(size=(8, 8, 3)) > 0.4).astype(np.float64)
USER_MATRIX = _rng.normal(size=(8, 3)) @ _rng.normal(size=(3, 6))  # 8 x 6, rank 3: a true pseudo-inverse

CG_TOL = 1e-10
BLUR_TASKS = ("gaussian_blur", "aniso_blur", "motion_blur")

LINEAR = [
    ("denoise", (8, 8, 3), {}),
    ("inpaint_box", (16, 16, 1), {}),
    ("inpaint_box", (8, 8, 3), {"box": 3}),
    ("inpaint_random", (16, 16, 1), {}),
    ("inpaint_random", (8, 8, 3), {"ratio": 0.5}),
    ("inpaint_random_official", (12, 8, 3), {}),
    ("inpaint_random_official", (8, 8, 1), {}),
    ("inpaint_mask", (8, 8, 3), {"mask": USER_MASK}),
    ("inpaint_mask", (8, 8, 3), {"mask": USER_MASK[..., 0]}),
    ("sr", (16, 16, 1), {"factor": 2, "kind": "avg"}),
    ("sr", (8, 8, 3), {"factor": 4, "kind": "avg"}),
    ("sr", (16, 16, 1), {"factor": 8, "kind": "avg"}),
    ("sr", (16, 16, 1), {"factor": 4, "kind": "bicubic"}),
    ("sr", (8, 8, 3), {"factor": 2, "kind": "bicubic"}),
    ("sr", (16, 16, 1), {"factor": 2, "kind": "bicubic", "pinv_method": "cg", "cg_tol": CG_TOL}),
    ("gaussian_blur", (16, 16, 1), {}),
    ("gaussian_blur", (8, 8, 3), {"kernel_size": 5, "std": 1.0}),
    ("aniso_blur", (16, 16, 1), {}),
    ("aniso_blur_svd", (16, 16, 1), {}),
    ("aniso_blur_svd", (8, 12, 3), {"drop_last_tap": False}),
    ("motion_blur", (16, 16, 1), {}),
    ("motion_blur", (8, 8, 3), {"kernel_size": 9}),
    ("cs", (16, 16, 1), {"ratio": 2}),
    ("cs", (8, 8, 3), {"ratio": 4}),
    ("cs", (16, 16, 1), {"ratio": 2, "construction": "official"}),
    ("cs", (8, 8, 3), {"ratio": 4, "construction": "official"}),
    ("matrix", (10,), {"rows": 6}),
    ("matrix", (6,), {"matrix": USER_MATRIX}),
    ("mask", (10,), {"keep": 4}),
]
NONLINEAR = [
    ("hdr", (8, 8, 3), {}),
    ("hdr", (8, 8, 3), {"pinv": "identity"}),
    ("phase_retrieval", (8, 8, 1), {}),
    ("phase_retrieval", (4, 6, 2), {"norm": "backward", "unit_range": True}),
]
ALL = LINEAR + NONLINEAR


def _seeded(task, kw):
    return (task in ("inpaint_random", "inpaint_random_official", "motion_blur", "cs", "mask")
            or (task == "matrix" and "rows" in kw))


def _id(cfg):
    task, shape, kw = cfg
    parts = [task, "x".join(map(str, shape))]
    parts += [f"{k}={'user' if isinstance(v, np.ndarray) else v}" for k, v in kw.items()]
    return "-".join(parts)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _rel(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / max(float(jnp.linalg.norm(jnp.ravel(b))), 1e-300))


# ------------------------------------------------------------------------------------------------------------------
# The matrix: every linear operator
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", LINEAR, ids=_id)
def test_linear_algebra(cfg, x64):
    task, shape, kw = cfg
    op = make_operator(task, shape, seed=3, **kw)
    assert op.linear
    u = _normal(0, shape)
    y = op.A(u)
    assert y.shape == op.out_shape and y.dtype == jnp.float64
    v = _normal(1, op.out_shape)
    atv = op.AT(v)
    assert atv.shape == shape and atv.dtype == jnp.float64

    # <A u, v> = <u, A^T v>
    lhs, rhs = float(jnp.vdot(y, v)), float(jnp.vdot(u, atv))
    assert abs(lhs - rhs) <= 1e-10 * float(jnp.linalg.norm(y.ravel()) * jnp.linalg.norm(v.ravel()))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)

    # the adjoint equals jax.linear_transpose of the forward map
    lt = jax.linear_transpose(op.A, jax.ShapeDtypeStruct(shape, jnp.float64))(v)[0]
    np.testing.assert_allclose(atv, lt, rtol=0, atol=1e-12 * float(jnp.abs(lt).max()))

    # dense matrix, and the pseudo-inverse against numpy's SVD pseudo-inverse of it
    M = np.asarray(op.matrix())
    assert M.shape == (op.out_size, op.in_size)
    np.testing.assert_allclose(M @ np.ravel(u), np.ravel(y), atol=1e-12)
    np.testing.assert_allclose(M.T @ np.ravel(v), np.ravel(atv), atol=1e-12)
    rcond = DEFAULT_PINV_RCOND if task in BLUR_TASKS else 1e-10
    p = op.pinv(v)
    assert p.shape == shape and p.dtype == jnp.float64
    tol = 1e-8 if kw.get("pinv_method") == "cg" else 1e-10
    assert _rel(np.ravel(p), np.linalg.pinv(M, rcond=rcond) @ np.ravel(v)) <= tol
    np.testing.assert_array_equal(op.x_init(v), p)

    # Penrose identities: A A+ A = A (bounds below), A+ A A+ = A+
    r = op.A(op.pinv(y))
    if task in BLUR_TASKS:
        # truncated inverse filter: |A A+ A u - A u| <= rcond * max|K| * |u|  (max|K| = 1: kernel sums to 1)
        assert float(jnp.linalg.norm((r - y).ravel())) <= DEFAULT_PINV_RCOND * float(jnp.linalg.norm(u.ravel()))
        sharp = make_operator(task, shape, seed=3, pinv_rcond=1e-12, **kw)
        assert _rel(sharp.A(sharp.pinv(y)), y) <= 1e-9
    elif kw.get("pinv_method") == "cg":
        # CG stops at |A A^T z - y| <= cg_tol |y|, and A A+ y - y is exactly that residual
        assert _rel(r, y) <= 2 * CG_TOL
    else:
        assert _rel(r, y) <= 1e-12
    assert _rel(op.pinv(op.A(p)), p) <= (1e-8 if kw.get("pinv_method") == "cg" else 1e-10)


@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_jit_vmap_shapes(cfg, x64):
    task, shape, kw = cfg
    op = make_operator(task, shape, seed=0, **kw)
    traces = []

    def f(o, x):
        traces.append(1)
        return o.A(x)

    jf = jax.jit(f)
    xs = _normal(2, (3,) + shape)
    ys = jf(op, xs)
    assert ys.shape == (3,) + op.out_shape
    ys2 = jf(op, xs + 1.0)  # new values, same shapes: no retrace
    op_other = make_operator(task, shape, seed=1, **kw)  # other fixed data (leaves), same static config
    jf(op_other, xs)
    assert len(traces) == 1
    # jit == eager, vmap == loop, arbitrary leading batch dims
    loop = jnp.stack([op.A(x) for x in xs])
    np.testing.assert_allclose(ys, loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ys2, op.A(xs + 1.0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(op.A)(xs), loop, rtol=1e-12, atol=1e-12)
    assert op.A(xs[0]).shape == op.out_shape
    nested = op.A(xs.reshape((1, 3) + shape))
    np.testing.assert_allclose(nested[0], loop, rtol=1e-12, atol=1e-12)
    methods = [op.AT, op.pinv] if op.linear else [op.x_init]
    for m in methods:
        got = m(ys)
        assert got.shape == (3,) + shape and got.dtype == jnp.float64
        np.testing.assert_allclose(got, jnp.stack([m(y) for y in ys]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", [c for c in ALL if _seeded(c[0], c[2])], ids=_id)
def test_seed_determinism(cfg):
    task, shape, kw = cfg
    a, b, c = (make_operator(task, shape, seed=s, **kw) for s in (5, 5, 6))
    la, lb, lc = (jax.tree_util.tree_leaves(o) for o in (a, b, c))
    assert len(la) > 0
    for p, q in zip(la, lb):
        np.testing.assert_array_equal(p, q)
    assert any(not np.array_equal(p, q) for p, q in zip(la, lc))
    x = _normal(0, shape).astype(jnp.float32)
    np.testing.assert_array_equal(a.A(x), b.A(x))


@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_wrong_shape(cfg):
    task, shape, kw = cfg
    op = make_operator(task, shape, **kw)
    bad = shape[:-1] + (shape[-1] + 1,)
    with pytest.raises(ValueError, match=f"{task}.*{', '.join(map(str, shape))}") as e:
        op.A(jnp.zeros(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(ValueError, match="trailing shape"):
        op.A(jnp.zeros(shape[1:]))
    y_bad = tuple(op.out_shape[:-1]) + (op.out_shape[-1] + 1,)
    with pytest.raises(ValueError, match=", ".join(map(str, op.out_shape))):
        (op.pinv if op.pinv_fn is not None else op.x_init)(jnp.zeros(y_bad))


def test_unknown_task_and_keyword():
    with pytest.raises(ValueError) as e:
        make_operator("deblur_everything", (8, 8, 3))
    for name in TASKS:
        assert name in str(e.value)
    with pytest.raises(TypeError, match="factr"):
        make_operator("sr", (8, 8, 3), factr=2)
    with pytest.raises(ValueError, match="power of 2"):
        make_operator("cs", (6, 6, 1))
    with pytest.raises(ValueError, match="factor"):
        make_operator("sr", (8, 8, 3), factor=3)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        make_operator("gaussian_blur", (16,))
    with pytest.raises(ValueError, match="0 or 1"):
        make_operator("inpaint_mask", (8, 8, 3), mask=USER_MASK * 0.5)


def test_nonlinear_have_no_adjoint():
    hdr = make_operator("hdr", (4, 4, 1))
    pr = make_operator("phase_retrieval", (4, 4, 1))
    with pytest.raises(TypeError, match="nonlinear"):
        hdr.AT(jnp.zeros((4, 4, 1)))
    with pytest.raises(TypeError, match="nonlinear"):
        pr.matrix()
    with pytest.raises(TypeError, match="pseudo-inverse"):
        pr.pinv(jnp.zeros((8, 8, 1)))


# ------------------------------------------------------------------------------------------------------------------
# measure(), vmap over operators, vjp
# ------------------------------------------------------------------------------------------------------------------


def test_measure_noise_std_and_determinism():
    op = make_operator("sr", (32, 32, 3), factor=2, kind="avg")
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(16, 32, 32, 3)), jnp.float32)
    key = jax.random.PRNGKey(7)
    sigma = 0.3
    measure = jax.jit(op.measure)  # sigma traced
    y = measure(key, x, sigma)
    n = np.asarray(y - op.A(x), np.float64).ravel()  # 16 * 16 * 16 * 3 = 12288 samples
    se = sigma / np.sqrt(n.size)
    assert abs(n.mean()) < 5 * se
    assert abs(n.std() - sigma) < 5 * sigma / np.sqrt(2 * n.size)
    np.testing.assert_array_equal(measure(key, x, sigma), y)
    assert not np.array_equal(measure(jax.random.PRNGKey(8), x, sigma), y)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(measure(key, x, 0.0), op.A(x), rtol=0, atol=1e-7)


def test_vmap_over_operators():
    ops = [make_operator("inpaint_random", (8, 8, 2), seed=s) for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ops)
    xs = _normal(0, (3, 8, 8, 2)).astype(jnp.float32)
    got = jax.vmap(lambda o, x: o.A(x))(stacked, xs)
    np.testing.assert_array_equal(got, jnp.stack([o.A(x) for o, x in zip(ops, xs)]))


SR_BICUBIC = next(c for c in LINEAR if c[0] == "sr" and c[2].get("kind") == "bicubic")


@pytest.mark.parametrize("cfg", NONLINEAR + [SR_BICUBIC], ids=_id)
def test_vjp_matches_finite_differences(cfg, x64):
    task, shape, kw = cfg
    op = make_operator(task, shape, **kw)
    x = 0.4 * _normal(0, shape)  # hdr: |2x| away from the clip kinks w.p. ~1; checked below
    if task == "hdr":
        assert float(jnp.min(jnp.abs(jnp.abs(2 * x) - 1))) > 1e-4
    d = _normal(1, shape)
    w = _normal(2, op.out_shape)
    eps = 1e-6
    fd = (jnp.vdot(w, op.A(x + eps * d)) - jnp.vdot(w, op.A(x - eps * d))) / (2 * eps)
    assert abs(float(fd - jnp.vdot(op.vjp(x, w), d))) <= 1e-6 * (1 + abs(float(fd)))
    if op.linear:
        np.testing.assert_allclose(op.vjp(x, w), op.AT(w), atol=1e-12)


def test_phase_retrieval_gradient_finite_at_zero():
    op = make_operator("phase_retrieval", (4, 4, 1))
    g = jax.grad(lambda x: jnp.sum(op.A(x) ** 2))(jnp.zeros((4, 4, 1)))
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------------------------------
# Per-task references
# ------------------------------------------------------------------------------------------------------------------


def test_hdr_reference(x64):
    op = make_operator("hdr", (8, 8, 3))
    x = 0.8 * _normal(0, (2, 8, 8, 3))
    xn = np.asarray(x)
    np.testing.assert_array_equal(op.A(x), np.clip(2 * xn, -1, 1))
    assert float(jnp.mean(jnp.abs(op.A(x)) == 1)) > 0.1  # the clip is active on part of the test image
    y = op.A(x)
    np.testing.assert_array_equal(op.x_init(y), np.asarray(y) / 2)
    np.testing.assert_array_equal(op.A(op.pinv(y)), y)


@pytest.mark.parametrize("shape,kw", [((8, 8, 1), {}), ((4, 6, 2), {"norm": "backward", "unit_range": True})])
def test_phase_retrieval_reference(shape, kw, x64):
    H, W, C = shape
    op = make_operator("phase_retrieval", shape, **kw)
    x = _normal(0, shape)
    xn = np.asarray(x)
    if kw.get("unit_range"):
        xn = (xn + 1) / 2
    ref = np.zeros((2 * H, 2 * W, C))
    ref[H // 2:H // 2 + H, W // 2:W // 2 + W] = xn
    ref = np.abs(np.fft.fft2(ref, axes=(0, 1), norm=kw.get("norm", "ortho")))
    np.testing.assert_allclose(op.A(x), ref, rtol=1e-12, atol=1e-12)
    if "norm" not in kw:  # Parseval with the orthonormal FFT
        np.testing.assert_allclose(np.sum(ref ** 2), np.sum(xn ** 2), rtol=1e-12)
    x0 = op.x_init(op.A(x))
    assert x0.shape == shape and float(jnp.abs(x0).max()) <= 1.0


def _direct_circular_conv(x, k):
    """y[i, j] = sum_{a, b} k[a, b] x[(i - a + kh//2) % H, (j - b + kw//2) % W] (per channel), by loops."""
    H, W, _ = x.shape
    kh, kw = k.shape
    y = np.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for a in range(kh):
                for b in range(kw):
                    y[i, j] += k[a, b] * x[(i - a + kh // 2) % H, (j - b + kw // 2) % W]
    return y


@pytest.mark.parametrize("task,kw", [("gaussian_blur", {"kernel_size": 3, "std": 0.8}),
                                     ("aniso_blur", {"kernel_size": 7, "std": (0.7, 2.0)}),
                                     ("motion_blur", {"kernel_size": 9})])  # 9 x 9 > 5 x 6 image: folded
def test_blur_equals_direct_circular_convolution(task, kw, x64):
    op = make_operator(task, (5, 6, 2), seed=4, **kw)
    k = np.asarray(op.data["kernel"])
    assert k.shape == (kw["kernel_size"],) * 2
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-12)
    assert k.min() >= 0
    x = np.random.default_rng(0).normal(size=(5, 6, 2))
    np.testing.assert_allclose(op.A(jnp.asarray(x)), _direct_circular_conv(x, k), atol=1e-12)


def test_gaussian_kernel():
    k = gaussian_kernel(61, 3.0)
    assert k.shape == (61, 61)
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(k, k.T, rtol=1e-12)
    np.testing.assert_allclose(k[30, 31] / k[30, 30], np.exp(-1 / 18), rtol=1e-12)
    ka = gaussian_kernel(61, (1.0, 20.0))
    np.testing.assert_allclose(ka[31, 30] / ka[30, 30], np.exp(-1 / 2), rtol=1e-12)
    np.testing.assert_allclose(ka[30, 31] / ka[30, 30], np.exp(-1 / 800), rtol=1e-12)
    # default operators use these kernels
    np.testing.assert_allclose(make_operator("gaussian_blur", (8, 8, 1)).data["kernel"], k, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(make_operator("aniso_blur", (8, 8, 1)).data["kernel"], ka, rtol=1e-6, atol=1e-30)


def test_motion_kernel():
    k = motion_kernel(0, 61, 0.5)
    assert k.shape == (61, 61) and k.min() >= 0
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(k, motion_kernel(0, 61, 0.5))
    assert not np.array_equal(k, motion_kernel(1, 61, 0.5))
    assert np.all(k[0] == 0) and np.all(k[:, 0] == 0)  # trajectory fits inside the window
    # the bounding box of the support spans kernel_size - 3 pixels (+1 for the bilinear footprint) on its long side
    rows, cols = np.nonzero(k)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) in (58, 59)

    # intensity 0: a straight segment (second-moment matrix of the kernel mass is rank one)
    def moments(kk):
        r, c = np.mgrid[:61, :61]
        pts = np.stack([r.ravel(), c.ravel()], 1).astype(float)
        mu = kk.ravel() @ pts
        d = pts - mu
        return np.linalg.eigvalsh((d * kk.ravel()[:, None]).T @ d)

    ev0 = moments(motion_kernel(3, 61, 0.0))
    assert ev0[0] / ev0[1] < 1e-3
    ev = moments(k)
    assert ev[0] / ev[1] > 1e-2  # intensity 0.5 (this seed) bends


def test_walsh_hadamard():
    jfwht = jax.jit(fwht, static_argnames="axis")
    for n in (1, 2, 16, 64):
        Hn = np.asarray(jfwht(jnp.eye(n, dtype=jnp.float32)))
        np.testing.assert_allclose(Hn, scipy.linalg.hadamard(n) / np.sqrt(n), atol=1e-6)
        np.testing.assert_allclose(Hn @ Hn.T, np.eye(n), atol=1e-6)
    x = _normal(0, (3, 32, 2)).astype(jnp.float32)
    np.testing.assert_allclose(jfwht(jfwht(x, axis=1), axis=1), x, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-2"):
        fwht(jnp.zeros(12))


def test_cs_structure(x64):
    op = make_operator("cs", (8, 8, 2), seed=2, ratio=4)
    assert op.out_shape == (16, 2)
    M = np.asarray(op.matrix())
    np.testing.assert_allclose(M @ M.T, np.eye(32), atol=1e-12)  # A A^T = I
    perm, rows = np.asarray(op.data["perm"]), np.asarray(op.data["rows"])
    assert sorted(perm) == list(range(64)) and len(set(rows.tolist())) == 16
    Hs = scipy.linalg.hadamard(64) / 8.0
    ref1 = Hs[rows][:, np.argsort(perm)]  # (S H P) with (P x)[i] = x[perm[i]]
    x = np.random.default_rng(0).normal(size=(8, 8, 2))
    y = np.asarray(op.A(jnp.asarray(x)))
    for c in range(2):
        np.testing.assert_allclose(y[:, c], ref1 @ x[:, :, c].ravel(), atol=1e-12)


def test_sr_avg_block_constant(x64):
    z = _normal(0, (4, 4, 3))
    x = jnp.repeat(jnp.repeat(z, 4, axis=0), 4, axis=1)  # 16 x 16, constant on 4 x 4 blocks
    op = make_operator("sr", (16, 16, 3), factor=4, kind="avg")
    np.testing.assert_allclose(op.A(x), z, rtol=0, atol=1e-14)
    np.testing.assert_allclose(op.pinv(op.A(x)), x, rtol=0, atol=1e-14)


def test_sr_bicubic_constant_and_pil(x64):
    from PIL import Image

    for f in (2, 4, 8):
        op = make_operator("sr", (16, 16, 2), factor=f, kind="bicubic")
        np.testing.assert_allclose(op.A(jnp.full((16, 16, 2), 0.37)), 0.37, rtol=1e-13)
        D = bicubic_matrix(16, f)
        np.testing.assert_allclose(D.sum(1), 1.0, rtol=1e-13)
    # PIL's antialiased bicubic (a = -0.5) on a float ('F' mode) image, a non-square one
    x = np.random.default_rng(0).uniform(-1, 1, size=(16, 8)).astype(np.float32)
    for f in (2, 4):
        ref = np.asarray(Image.fromarray(x).resize((8 // f, 16 // f), Image.Resampling.BICUBIC), np.float64)
        got = make_operator("sr", (16, 8, 1), factor=f, kind="bicubic").A(jnp.asarray(x[:, :, None], jnp.float64))
        np.testing.assert_allclose(got[:, :, 0], ref, atol=2e-6)
