"""Data sets for the book: bundled digits, long-tailed subsets, real loaders behind a flag.

Everything here runs offline. The default image set is scikit-learn's bundled ``digits``
(1,797 grey 8×8 images). MNIST (idx files) and CIFAR-10 (its *binary* version, which needs no
pickle) load from local files; they are fetched only with an explicit ``download=True``, and
every fetched file is checked against the sha256 in :data:`REGISTRY`. Introduced in Chapter 0.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effnb.config import check_choice

__all__ = [
    "REGISTRY",
    "RemoteFile",
    "Split",
    "atomic_path",
    "check_sha256",
    "class_counts",
    "fetch",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "long_tail_counts",
    "long_tail_subset",
    "read_cifar10_binary",
    "read_idx",
    "read_sha256sums",
    "sha256_of",
    "write_sha256sums",
]


@dataclass(frozen=True)
class Split:
    """A train/test split as tensors: images ``(N, C, H, W)`` float32 in [0, 1], labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``size × size``; ``None`` keeps the size."""
    if size is None or x.shape[-1] == size:
        return x
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int (pixels per side) or None.")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, num_classes: int) -> Split:
    """Stratified train/test split with a fixed seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1, e.g. 0.25.")
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test], num_classes)


def load_digits(size: int | None = 8, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8×8 digits as a stratified split, optionally resized to ``size``.

    Returns a :class:`Split` with images ``(N, 1, size, size)`` in [0, 1]. Introduced in Chapter 0.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(_resize(x, size), y, test_fraction, seed, num_classes=10)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    r"""Images kept per class for a long-tailed set: :math:`n_c = \lfloor n_{max} r^{c/(C-1)} \rfloor`, :math:`r = 1/\beta`.

    ``imbalance`` is :math:`\beta = n_0 / n_{C-1}` (1 keeps every class at ``n_max``).
    CIFAR-10-LT with ``n_max=5000, imbalance=10`` gives ``[5000, 3871, ..., 500]``. Introduced in Chapter 0.
    """
    if imbalance < 1:
        raise ValueError(f"imbalance={imbalance!r} must be >= 1 (largest class / smallest class).")
    if num_classes < 2 or n_max < 1:
        raise ValueError(f"need num_classes >= 2 and n_max >= 1, got {num_classes} and {n_max}.")
    r = 1.0 / imbalance
    # A tiny epsilon keeps exact powers (r**1 * n_max) from flooring one image short.
    return [int(math.floor(n_max * r ** (c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def class_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class, ``(num_classes,)`` int64."""
    return torch.bincount(y, minlength=num_classes)


def long_tail_subset(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, imbalance: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample ``(x, y)`` so that class ``c`` keeps :func:`long_tail_counts` images.

    ``n_max`` is the size of the smallest class, so every class can supply its quota; which
    images are kept is random with ``seed``. Returns ``(x_lt, y_lt)``. Introduced in Chapter 0.
    """
    counts = class_counts(y, num_classes)
    quotas = long_tail_counts(int(counts.min()), num_classes, imbalance)
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c, quota in enumerate(quotas):
        members = torch.nonzero(y == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=gen)[:quota]])
    idx = torch.cat(keep).sort().values
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- real data sets
@dataclass(frozen=True)
class RemoteFile:
    """A file the book may download: where from, its name on disk and its sha256."""

    url: str
    filename: str
    sha256: str


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
REGISTRY: dict[str, list[RemoteFile]] = {
    "mnist": [
        RemoteFile(_MNIST + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz",
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile(_MNIST + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile(_MNIST + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile(_MNIST + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ],
    "cifar10": [
        RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "cifar-10-binary.tar.gz",
                   "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ],
}


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str, fix: str, label: str | None = None) -> None:
    """Raise one ``ValueError`` sentence unless the file at ``path`` has the hex sha256 ``expected``.

    The one check every effnb file goes through (downloads, checkpoints, reference models):
    ``LABEL is corrupt (sha256 abc… instead of def…); FIX.`` ``label`` defaults to the path.
    Introduced in Chapter 0.
    """
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ValueError(f"{label or path} is corrupt (sha256 {actual[:12]}… instead of {expected[:12]}…); {fix}.")


@contextmanager
def atomic_path(path: str | Path, sha256: str | None = None, fix: str = "write it again") -> Iterator[Path]:
    """Write a file all at once or not at all: yields a temporary path in the same folder; when the
    block ends without error (and the temporary file has the given ``sha256``, if any), it replaces
    ``path`` with ``os.replace``, which is atomic on one file system.

    On any error the temporary file is deleted and ``path`` keeps its old content, so an interrupt
    never leaves a half-written file or a ``.part`` behind. The new file keeps the old one's
    permission bits (0o644 for a new file). Introduced in Chapter 0.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".name.x1y2.part.ext": hidden, clearly temporary, and still ending in the file's own suffix
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".part{path.suffix}")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if sha256 is not None:
            check_sha256(tmp, sha256, fix, label=path)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sha256sums(path: str | Path) -> dict[str, str]:
    """``{file name: hex sha256}`` from a manifest in ``sha256sum`` format (``<digest>  <name>`` a line).

    A missing manifest reads as empty. The one manifest format of the book (bundled data,
    reference checkpoints); ``sha256sum -c SHA256SUMS`` checks it without Python. Introduced in Chapter 2.
    """
    path = Path(path)
    if not path.exists():
        return {}
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {name.strip().lstrip("*"): digest.lower() for digest, name in rows}


def write_sha256sums(path: str | Path, digests: dict[str, str]) -> None:
    """Write ``digests`` (``{file name: hex sha256}``) as a ``sha256sum`` manifest, sorted by name,
    atomically (:func:`atomic_path`). Introduced in Chapter 2.
    """
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())))


def fetch(name: str, root: str | Path, download: bool = False) -> list[Path]:
    """Paths of data set ``name``'s files under ``root``, checked against their sha256.

    Missing files are downloaded only when ``download=True``, into a temporary file that replaces
    the final name only after its sha256 matched (:func:`atomic_path`); otherwise a
    ``FileNotFoundError`` says where to put them. A file whose sha256 differs raises ``ValueError``.
    Introduced in Chapter 0.
    """
    check_choice("name", name, sorted(REGISTRY))
    root = Path(root)
    paths = []
    for remote in REGISTRY[name]:
        path = root / remote.filename
        fix = "delete it and fetch again (download=True)"
        if path.exists():
            check_sha256(path, remote.sha256, fix)
        elif not download:
            raise FileNotFoundError(
                f"{path} is missing; pass download=True (needs internet) or copy {remote.filename} into {root}."
            )
        else:
            fix_download = f"nothing was kept; fetch again, or check the URL {remote.url} in effnb.data.REGISTRY"
            with atomic_path(path, sha256=remote.sha256, fix=fix_download) as partial:
                with urllib.request.urlopen(remote.url, timeout=60) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out)
        paths.append(path)
    return paths


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST's format, optionally gzipped) into a NumPy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path} holds {body.size} values, its header promises {math.prod(shape)}.")
    return body.reshape(shape)


def load_mnist(root: str | Path, download: bool = False, size: int | None = None) -> Split:
    """MNIST from its four idx files under ``root`` (fetched only with ``download=True``).

    Returns a :class:`Split` with images ``(N, 1, 28, 28)`` (or ``size``) in [0, 1]. Introduced in Chapter 0.
    """
    paths = {p.name: p for p in fetch("mnist", root, download)}

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(paths[name]).astype(np.float32) / 255.0).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(paths[name]).astype(np.int64))

    return Split(
        _resize(images("train-images-idx3-ubyte.gz"), size), labels("train-labels-idx1-ubyte.gz"),
        _resize(images("t10k-images-idx3-ubyte.gz"), size), labels("t10k-labels-idx1-ubyte.gz"),
        num_classes=10,
    )


_CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar10_binary(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR-10 binary records (1 label byte + 3072 pixel bytes) into ``(N, 3, 32, 32)`` uint8 and labels."""
    if len(data) % _CIFAR_RECORD:
        raise ValueError(f"CIFAR-10 binary data must be a multiple of {_CIFAR_RECORD} bytes, got {len(data)}.")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def load_cifar10(root: str | Path, download: bool = False, size: int | None = None) -> Split:
    """CIFAR-10 from ``cifar-10-binary.tar.gz`` under ``root`` (fetched only with ``download=True``).

    Returns a :class:`Split` with images ``(N, 3, 32, 32)`` (or ``size``) in [0, 1]. Introduced in Chapter 0.
    """
    (archive,) = fetch("cifar10", root, download)
    parts: dict[str, list[bytes]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = Path(member.name).name
            if base.startswith("data_batch_") and base.endswith(".bin"):
                parts["train"].append(tar.extractfile(member).read())
            elif base == "test_batch.bin":
                parts["test"].append(tar.extractfile(member).read())
    if not parts["train"] or not parts["test"]:
        raise ValueError(f"{archive} lacks data_batch_*.bin or test_batch.bin; is it the binary version?")
    (xtr, ytr), (xte, yte) = (read_cifar10_binary(b"".join(parts[k])) for k in ("train", "test"))

    def as_float(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0)

    return Split(_resize(as_float(xtr), size), torch.from_numpy(ytr),
                 _resize(as_float(xte), size), torch.from_numpy(yte), num_classes=10)
