"""The official task definitions (the paper's code: DDRM / DDNM ``svd_operators.py``) against float64 NumPy
transcriptions written here, independently of :mod:`mapreps_jax.operators`.

Each reference follows the official construction step by step (loops that build the 1-D blur matrices, the SVD
with singular values below 0.03 zeroed and the 2-D singular values as products, the in-place Walsh-Hadamard
butterfly, ``randperm(HW)[:HW // 2]`` applied to the channel-interleaved vector, the block average with its SVD
pseudo-inverse) and is compared with the operator on random inputs. The generic properties (adjoint, Penrose
identities, jit / vmap, seeds, shape errors) of the same operators are in the matrix of ``tests/test_operators.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import jax.numpy as jnp

from mapreps_jax.operators import make_operator


def _rand(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


# ------------------------------------------------------------------------------------------------------------------
# SR x4: block average, pixel replication as pseudo-inverse (DDRM / DDNM SuperResolution)
# ------------------------------------------------------------------------------------------------------------------


def test_sr4_block_average_and_replication_pinv(x64):
    H, W, C, f = 16, 12, 3, 4
    op = make_operator("sr", (H, W, C), factor=4, kind="avg")
    x = _rand(0, (H, W, C))
    ref = np.zeros((H // f, W // f, C))
    for i in range(H // f):
        for j in range(W // f):
            ref[i, j] = x[f * i:f * i + f, f * j:f * j + f].reshape(-1, C).mean(0)
    np.testing.assert_allclose(op.A(jnp.asarray(x)), ref, rtol=0, atol=1e-13)

    # SuperResolution's pseudo-inverse: per block, V (U^T y / s) with the SVD of the 1 x 16 row [1/16, ..., 1/16]
    U, s, Vt = np.linalg.svd(np.full((1, f * f), 1.0 / f ** 2))
    y = _rand(1, (H // f, W // f, C))
    pref = np.zeros((H, W, C))
    for i in range(H // f):
        for j in range(W // f):
            for c in range(C):
                pref[f * i:f * i + f, f * j:f * j + f, c] = (Vt[0] * (U[0, 0] * y[i, j, c] / s[0])).reshape(f, f)
    np.testing.assert_allclose(pref[:f, :f, 0], y[0, 0, 0], rtol=1e-12)  # it is pixel replication
    np.testing.assert_allclose(op.pinv(jnp.asarray(y)), pref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(op.x_init(jnp.asarray(y)), op.pinv(jnp.asarray(y)))


# ------------------------------------------------------------------------------------------------------------------
# Anisotropic deblur (DDRM / DDNM Deblurring2D with the deblur_aniso kernels)
# ------------------------------------------------------------------------------------------------------------------


def _official_kernel(sigma):
    pdf = [np.exp(-0.5 * (u / sigma) ** 2) for u in (-4, -3, -2, -1, 0, 1, 2, 3, 4)]
    k = np.asarray(pdf)
    return k / k.sum()


def _official_1d_matrix(n, kernel, full=False):
    """Deblurring2D's loop: ``for j in range(i - K//2, i + K//2)`` (``+ 1`` with ``full``), zero boundary."""
    K = kernel.shape[0]
    A = np.zeros((n, n))
    for i in range(n):
        for j in range(i - K // 2, i + K // 2 + (1 if full else 0)):
            if j < 0 or j >= n:
                continue
            A[i, j] = kernel[j - i + K // 2]
    return A


def _deblur2d_reference(H, W, full=False, zero=3e-2):
    """``(forward, pinv)`` of Deblurring2D: x -> U1 (S * (V1^T x V2)) U2^T with S = outer(s1, s2) (the 2-D singular
    values as products of the 1-D ones, each zeroed below ``zero``); pinv: V1 ((U1^T y U2) / S) V2^T, 0 where
    S = 0. Vertical kernel std 1 (kernel1, rows), horizontal std 20 (kernel2, columns)."""
    U1, s1, V1t = np.linalg.svd(_official_1d_matrix(H, _official_kernel(1.0), full))
    U2, s2, V2t = np.linalg.svd(_official_1d_matrix(W, _official_kernel(20.0), full))
    s1 = np.where(s1 < zero, 0.0, s1)
    s2 = np.where(s2 < zero, 0.0, s2)
    S = np.outer(s1, s2)
    Sinv = np.where(S == 0, 0.0, 1.0 / np.where(S == 0, 1.0, S))

    def fwd(x):
        return np.stack([U1 @ (S * (V1t @ x[:, :, c] @ V2t.T)) @ U2.T for c in range(x.shape[2])], -1)

    def pinv(y):
        return np.stack([V1t.T @ (Sinv * (U1.T @ y[:, :, c] @ U2)) @ V2t for c in range(y.shape[2])], -1)

    return fwd, pinv, (s1 == 0).sum(), (s2 == 0).sum()


@pytest.mark.parametrize("shape,full", [((16, 16, 3), False), ((12, 20, 2), False), ((16, 16, 1), True)])
def test_aniso_blur_svd_equals_official_construction(shape, full, x64):
    H, W, C = shape
    fwd, pinv, z1, z2 = _deblur2d_reference(H, W, full)
    assert z1 + z2 > 0  # the 0.03 truncation is active at these sizes (not a vacuous comparison)
    op = make_operator("aniso_blur_svd", shape, drop_last_tap=not full)
    x = _rand(0, shape)
    y = _rand(1, shape)
    np.testing.assert_allclose(op.A(jnp.asarray(x)), fwd(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(op.pinv(jnp.asarray(y)), pinv(y), rtol=0, atol=1e-9 * np.abs(pinv(y)).max())
    np.testing.assert_array_equal(op.x_init(jnp.asarray(y)), op.pinv(jnp.asarray(y)))
    # the truncated forward map differs from the plain zero-boundary convolution
    plain = np.stack([_official_1d_matrix(H, _official_kernel(1.0), full) @ x[:, :, c]
                      @ _official_1d_matrix(W, _official_kernel(20.0), full).T for c in range(C)], -1)
    assert np.abs(fwd(x) - plain).max() > 1e-3


def test_aniso_blur_svd_orientation_and_taps(x64):
    """Without truncation, the impulse response is the outer product of the two 9-tap kernels: std 1 down the
    rows (vertical), std 20 along the columns (horizontal), the official loop leaving out the last tap."""
    H = W = 32
    op = make_operator("aniso_blur_svd", (H, W, 1), sv_cutoff=0.0)
    e = np.zeros((H, W, 1))
    e[16, 16, 0] = 1.0
    r = np.asarray(op.A(jnp.asarray(e)))[:, :, 0]
    g1 = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    g20 = np.exp(-0.5 * (np.arange(-4, 5) / 20.0) ** 2)
    # A[i, j] = k[j - i + 4] for j - i in [-4, 3]: the impulse at column 16 reaches rows i = 13 .. 20
    ref = np.zeros((H, W))
    for i in range(13, 21):
        for j in range(13, 21):
            ref[i, j] = g1[16 - i + 4] * g20[16 - j + 4] / (g1.sum() * g20.sum())
    np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-15)
    # the dropped tap (offset j - i = +4): nothing reaches row 12 or column 12; offset -4 (row / column 20) does
    # (the operator is U diag(s) V^T: zeros up to round-off)
    assert np.abs(r[12]).max() < 1e-12 * r.max() and np.abs(r[:, 12]).max() < 1e-12 * r.max()
    assert r[20, 16] > 1e-6 * r.max() and r[16, 20] > 1e-6 * r.max()  # exp(-8) = 3e-4 vertically
    np.testing.assert_allclose(r[15, 16] / r[16, 16], np.exp(-0.5), rtol=1e-12)       # vertical: std 1
    np.testing.assert_allclose(r[16, 15] / r[16, 16], np.exp(-1 / 800), rtol=1e-12)   # horizontal: std 20


def test_aniso_blur_svd_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        make_operator("aniso_blur_svd", (8, 8, 1), kernel_size=8)
    with pytest.raises(ValueError, match="std"):
        make_operator("aniso_blur_svd", (8, 8, 1), std=(1.0, 0.0))
    with pytest.raises(ValueError, match="sv_cutoff"):
        make_operator("aniso_blur_svd", (8, 8, 1), sv_cutoff=-1.0)


# ------------------------------------------------------------------------------------------------------------------
# Random inpainting mask: randperm(HW)[:HW // 2] on the channel-interleaved vector
# ------------------------------------------------------------------------------------------------------------------


def test_inpaint_random_official_mask_statistics():
    H, W, C = 256, 256, 3
    op = make_operator("inpaint_random_official", (H, W, C), seed=0)
    m = np.asarray(op.data["mask"])
    assert m.shape == (H, W, C) and set(np.unique(m)) == {0.0, 1.0}
    missing = m == 0
    assert missing.sum() == H * W // 2
    assert missing.mean() == pytest.approx(1 / 6, abs=0)  # 32768 / 196608
    rows = np.nonzero(missing)[0]
    assert rows.max() < -(-H // 3) and rows.max() == H // 3  # all in the top third: rows 0 .. 85
    assert np.all(m[H // 3 + 1:] == 1)
    # each channel independently: about a third of the missing entries per channel, different patterns
    per_channel = missing.sum(axis=(0, 1))
    assert np.all(np.abs(per_channel - H * W // 6) < 5 * np.sqrt(H * W / 6))
    assert not np.array_equal(missing[..., 0], missing[..., 1])
    # within the top third, half of the entries are missing
    assert missing[:H // 3].mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("shape,seed", [((16, 16, 3), 0), ((9, 12, 3), 5), ((8, 8, 1), 2)])
def test_inpaint_random_official_equals_official_indexing(shape, seed, x64):
    """The official Inpainting operator: the NCHW image is permuted to (HW, C) and flattened (channel-interleaved);
    the entries at ``missing = randperm(HW)[:HW // 2]`` are removed. Our y keeps the image layout with zeros there."""
    H, W, C = shape
    n = H * W
    missing = np.random.default_rng(seed).permutation(n)[:n // 2]
    kept = np.setdiff1d(np.arange(n * C), missing)
    x = _rand(3, shape)
    x_chw = np.transpose(x, (2, 0, 1))                             # what the official code holds
    interleaved = x_chw.reshape(C, n).T.reshape(-1)                 # vec.reshape(B, C, -1).permute(0, 2, 1)
    y = np.asarray(make_operator("inpaint_random_official", shape, seed=seed).A(jnp.asarray(x))).reshape(-1)
    np.testing.assert_array_equal(y[kept], interleaved[kept])
    np.testing.assert_array_equal(y[missing], 0.0)
    assert missing.max() < n  # the indices never reach past the first H W entries (top H / C rows)


# ------------------------------------------------------------------------------------------------------------------
# HDR with the identity as pseudo-inverse
# ------------------------------------------------------------------------------------------------------------------


def test_hdr_identity_pinv(x64):
    x = 0.8 * _rand(0, (2, 8, 8, 3))
    off = make_operator("hdr", (8, 8, 3), pinv="identity")
    ours = make_operator("hdr", (8, 8, 3))
    y = np.asarray(off.A(jnp.asarray(x)))
    np.testing.assert_array_equal(y, np.clip(2 * x, -1, 1))
    np.testing.assert_array_equal(off.pinv(jnp.asarray(y)), y)
    np.testing.assert_array_equal(off.x_init(jnp.asarray(y)), y)
    np.testing.assert_array_equal(ours.pinv(jnp.asarray(y)), y / 2)  # the default is unchanged
    with pytest.raises(ValueError, match="pinv"):
        make_operator("hdr", (8, 8, 3), pinv="inverse")


# ------------------------------------------------------------------------------------------------------------------
# CS: a random subset of the Walsh-Hadamard coefficients (DDRM / DDNM WalshHadamardCS)
# ------------------------------------------------------------------------------------------------------------------


def _official_fwht(v, img_dim):
    """WalshHadamardCS.fwht: the in-place butterfly on ``[C, HW]`` rows, divided by ``img_dim = sqrt(HW)``."""
    a = np.array(v, dtype=np.float64)
    C, n = a.shape
    h = 1
    while h < n:
        a = a.reshape(C, -1, 2 * h)
        b = a.copy()
        a[:, :, :h] = b[:, :, :h] + b[:, :, h:2 * h]
        a[:, :, h:2 * h] = b[:, :, :h] - b[:, :, h:2 * h]
        h *= 2
    return a.reshape(C, n) / img_dim


@pytest.mark.parametrize("shape,ratio,seed", [((8, 8, 3), 2, 0), ((16, 16, 1), 4, 3)])
def test_cs_official_equals_walsh_hadamard_subset(shape, ratio, seed, x64):
    H, W, C = shape
    n = H * W
    op = make_operator("cs", shape, seed=seed, ratio=ratio, construction="official")
    assert op.out_shape == (n // ratio, C)
    x = _rand(0, shape)
    # Vt: fwht per channel, coefficients in perm order, channel-interleaved; A keeps the first C n / ratio entries
    perm = np.random.default_rng(seed).permutation(n)
    coef = _official_fwht(np.transpose(x, (2, 0, 1)).reshape(C, n), np.sqrt(n))
    flat = coef[:, perm].T.reshape(-1)[:C * n // ratio]
    y_ref = flat.reshape(n // ratio, C)
    np.testing.assert_allclose(op.A(jnp.asarray(x)), y_ref, rtol=0, atol=1e-12)
    # the butterfly is the natural-order (Sylvester) Hadamard matrix, so y = (H_n / sqrt(n))[perm[:m]] x_c
    Hn = scipy.linalg.hadamard(n) / np.sqrt(n)
    for c in range(C):
        np.testing.assert_allclose(y_ref[:, c], Hn[perm[:n // ratio]] @ x[:, :, c].ravel(), atol=1e-12)
    # no pixel permutation: differs from the default construction with the same seed
    assert not np.allclose(make_operator("cs", shape, seed=seed, ratio=ratio).A(jnp.asarray(x)), y_ref)
    # orthonormal rows: A A^T = I, A^+ = A^T; the official pinv V (add_zeros(y)) is the same map
    M = np.asarray(op.matrix())
    np.testing.assert_allclose(M @ M.T, np.eye(C * n // ratio), atol=1e-12)
    yv = _rand(1, op.out_shape)
    z = np.zeros((n, C))
    z[:n // ratio] = yv
    temp = np.zeros((C, n))
    temp[:, perm] = z.T                                    # V: temp[:, :, perm] = vec.reshape(-1, C).permute
    ref_pinv = _official_fwht(temp, np.sqrt(n)).T.reshape(H, W, C)
    np.testing.assert_allclose(op.pinv(jnp.asarray(yv)), ref_pinv, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="construction"):
        make_operator("cs", shape, construction="dct")
