"""Which artifact files this machine has already checked against their SHA-256: a load re-hashes a file
only when it is new here or has changed since (another device, inode, size or modification time).

Why: hashing MiniLM's 55 MB artifact takes ~40 ms of a ~5 s cold start, on every load, while a file that
``coalora adapt`` wrote here, or that an earlier load hashed, is the same file until one of those changes.
A mark is an empty file in ``<cache>/verified/`` named after that fingerprint and the expected checksum;
``coalora.load(..., verify="always")`` hashes every time, ``verify=False`` checks sizes only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from coalora.utils import default_cache_dir


def _mark(path: Path, checksum: str) -> Path:
    st = path.stat()
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{checksum}"
    return default_cache_dir() / "verified" / hashlib.sha256(key.encode()).hexdigest()[:32]


def already_verified(path: Path, checksum: str) -> bool:
    """True if this very file (same fingerprint) was hashed to ``checksum`` here before."""
    try:
        return _mark(path, checksum).is_file()
    except OSError:
        return False


def mark_verified(path: Path, checksum: str) -> None:
    """Remember that ``path`` hashes to ``checksum``; best effort (a read-only cache costs re-hashing)."""
    try:
        mark = _mark(path, checksum)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    except OSError:
        pass
