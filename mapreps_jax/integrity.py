"""File checksums of checkpoint folders, written once: used by the bundled checkpoint's ``checksums.json``
(:mod:`mapreps_jax.app.pretrained`) and by converted checkpoints' ``meta.json`` (:mod:`mapreps_jax.networks.convert`).

Files are checked BEFORE a loader (orbax) reads them, sizes before hashes, so a truncated, altered, missing or extra
file is one ``ValueError`` that names it and what was expected.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List

__all__ = ["sha256_file", "files_under", "file_records", "verify_file_records"]


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def files_under(root: str, sub: str) -> List[str]:
    """Relative paths (``/``-separated, from ``root``) of every file under ``root/sub``, sorted."""
    out = []
    for r, dirs, files in os.walk(os.path.join(root, sub)):
        dirs.sort()
        for f in sorted(files):
            out.append(os.path.relpath(os.path.join(r, f), root).replace(os.sep, "/"))
    return out


def file_records(root: str, sub: str) -> Dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root/sub``."""
    return {rel: {"sha256": sha256_file(os.path.join(root, rel)), "size": os.path.getsize(os.path.join(root, rel))}
            for rel in files_under(root, sub)}


def verify_file_records(root: str, sub: str, records: Dict[str, dict], where: str, hint: str) -> None:
    """Every file of ``records`` (relative to ``root``) present with its size and SHA-256, and no other file under
    ``root/sub``; else ``ValueError`` naming the first bad file, ``where`` the records come from, and ``hint``."""
    have = set(files_under(root, sub))
    for rel, rec in sorted(records.items()):
        full = os.path.join(root, rel)
        if rel not in have:
            raise ValueError(f"{full}: missing file; {where} records it ({rec.get('size')} bytes); {hint}")
        size = os.path.getsize(full)
        if size != rec.get("size"):
            raise ValueError(f"{full}: expected {rec.get('size')} bytes as recorded in {where}, got {size} bytes "
                             f"(truncated or altered file); {hint}")
        digest = sha256_file(full)
        if digest != rec.get("sha256"):
            raise ValueError(f"{full}: SHA-256 mismatch: expected {rec.get('sha256')} as recorded in {where}, got "
                             f"{digest}; {hint}")
    extra = sorted(have - set(records))
    if extra:
        raise ValueError(f"{os.path.join(root, extra[0])}: unexpected file, not recorded in {where} "
                         f"({len(extra)} in all); {hint}")
