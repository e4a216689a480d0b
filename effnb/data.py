"""Data sets for the book: bundled digits, long-tailed subsets, generated scenes, real loaders behind a flag.

Everything here runs offline. The default image set is scikit-learn's bundled ``digits``
(1,797 grey 8×8 images). MNIST (idx files) and CIFAR-10 (its *binary* version, which needs no
pickle) load from local files; they are fetched only with an explicit ``download=True``, and
every fetched file is checked against the sha256 in :data:`REGISTRY`. Introduced in Chapter 0.

Chapter 7 adds multi-task dense prediction: :func:`make_dense_scenes` generates scenes with
segmentation, depth, normals and boundaries, and :func:`load_nyud` reads NYUD-v2 in the same form.
Chapter 9 adds question scenes: :func:`make_question_scenes` draws objects in quadrants and asks
one question per scene whose answer depends on a few regions of the image.
Chapter 10 adds multi-spectral neuron volumes: :func:`make_neuron_volume` generates Brainbow-like
volumes with SWC ground truth; :func:`read_tiff_stack` and :func:`read_swc` read real ones.
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effnb.config import check_choice, check_count

__all__ = [
    "ANSWERS",
    "NYUD_ARCHIVE_URL",
    "QUADRANTS",
    "QUESTION_COLOURS",
    "QUESTION_SHAPES",
    "QUESTION_TYPES",
    "QuestionScenes",
    "NYUD_PAGE",
    "REGISTRY",
    "PLANES",
    "SCENE_SHAPES",
    "DenseScenes",
    "NeuronVolume",
    "RemoteFile",
    "Split",
    "atomic_path",
    "boundaries_from_segmentation",
    "check_sha256",
    "class_counts",
    "dense_scene_split",
    "fetch",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_nyud",
    "long_tail_counts",
    "long_tail_subset",
    "make_dense_scenes",
    "make_neuron_volume",
    "make_question_scenes",
    "normals_from_depth",
    "read_cifar10_binary",
    "read_idx",
    "read_sha256sums",
    "read_swc",
    "read_tiff_stack",
    "sha256_of",
    "start_box",
    "StartBox",
    "write_sha256sums",
    "write_swc",
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

    def to(self, device: str | torch.device) -> Split:
        """The same split with its four tensors on ``device`` (a GPU keeps small data sets resident)."""
        return Split(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                     self.y_test.to(device), self.num_classes)


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


# ----------------------------------------------------------------------------- dense scenes (Chapter 7)
_DENSE_TENSORS = ("images", "segmentation", "depth", "normals", "boundaries")


@dataclass(frozen=True)
class DenseScenes:
    """Images and four dense targets for multi-task prediction, one row per scene.

    ``images`` ``(N, 3, H, W)`` float32 in [0, 1]; ``segmentation`` ``(N, H, W)`` int64 in
    ``[0, num_classes)``, or ``ignore_index`` where a pixel has no label (NYUD-v2's unlabelled
    pixels; generated scenes have none); ``depth`` ``(N, 1, H, W)`` float32; ``normals``
    ``(N, 3, H, W)`` float32 unit vectors (zero where unknown); ``boundaries`` ``(N, 1, H, W)``
    float32 in {0, 1}. Introduced in Chapter 7.
    """

    images: torch.Tensor
    segmentation: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor
    boundaries: torch.Tensor
    num_classes: int
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(self.images.shape)}.")
        n, _, h, w = self.images.shape
        expected = {"segmentation": (n, h, w), "depth": (n, 1, h, w), "normals": (n, 3, h, w),
                    "boundaries": (n, 1, h, w)}
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"{name} has shape {actual}; images of shape {(n, 3, h, w)} need {shape}.")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> DenseScenes:
        """The same scenes with every tensor on ``device``."""
        return replace(self, **{name: getattr(self, name).to(device) for name in _DENSE_TENSORS})

    def subset(self, index: int | slice | list[int] | torch.Tensor) -> DenseScenes:
        """The scenes at ``index`` (an int, a slice, a list of ints, an int or bool tensor) as new
        :class:`DenseScenes`; an int keeps the leading ``N`` axis (``N = 1``)."""
        if isinstance(index, int):
            index = [index]
        return replace(self, **{name: getattr(self, name)[index] for name in _DENSE_TENSORS})


def normals_from_depth(depth: torch.Tensor, pixel_size: float = 1.0) -> torch.Tensor:
    r"""Unit surface normals ``(N, 3, H, W)`` of a depth map ``(N, 1, H, W)`` by finite differences.

    :math:`n = (-\partial z/\partial x, -\partial z/\partial y, 1) / \lVert\cdot\rVert`, with x along
    the columns (to the right), y along the rows (down), and derivatives in depth units per
    ``pixel_size``: central differences inside, one-sided at the border (``torch.gradient``). A
    plane :math:`z = ax + by + c` gets exactly :math:`(-a, -b, 1)/\sqrt{a^2 + b^2 + 1}` at every
    pixel; at a depth jump between two surfaces the pixels on both sides tilt toward the far one.
    Introduced in Chapter 7.
    """
    if depth.ndim != 4 or depth.shape[1] != 1 or min(depth.shape[-2:]) < 2:
        raise ValueError(f"depth must have shape (N, 1, H, W) with H, W >= 2, got {tuple(depth.shape)}.")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size={pixel_size!r} must be positive, e.g. pixel_size=1.0.")
    dz_dy, dz_dx = torch.gradient(depth.float(), spacing=pixel_size, dim=(2, 3))
    normals = torch.cat([-dz_dx, -dz_dy, torch.ones_like(dz_dx)], dim=1)  # (N, 3, H, W)
    return normals / normals.norm(dim=1, keepdim=True)


def boundaries_from_segmentation(segmentation: torch.Tensor) -> torch.Tensor:
    """Boundary map ``(N, 1, H, W)`` float32 in {0, 1} of a label map ``(N, H, W)``.

    A pixel is a boundary pixel when one of its 4-neighbours (left, right, up, down) has another
    label, so every label change marks the pixels on both sides of it (a line two pixels wide).
    Introduced in Chapter 7.
    """
    if segmentation.ndim != 3:
        raise ValueError(f"segmentation must have shape (N, H, W), got {tuple(segmentation.shape)}.")
    edge = torch.zeros_like(segmentation, dtype=torch.bool)
    across = segmentation[:, :, 1:] != segmentation[:, :, :-1]  # (N, H, W-1) left/right changes
    edge[:, :, 1:] |= across
    edge[:, :, :-1] |= across
    down = segmentation[:, 1:, :] != segmentation[:, :-1, :]  # (N, H-1, W) up/down changes
    edge[:, 1:, :] |= down
    edge[:, :-1, :] |= down
    return edge.unsqueeze(1).float()


# Class c >= 1 draws the shape SCENE_SHAPES[(c - 1) % 5] and a colour of its own hue.
SCENE_SHAPES: tuple[str, ...] = ("disc", "rectangle", "triangle", "ring", "cross")
_HAZE = np.array([0.72, 0.76, 0.82], dtype=np.float32)  # the colour far surfaces fade toward
_HAZE_DEPTH = 16.0  # depth at which a surface keeps 1/e of its own colour
_LIGHT_ELEVATION = np.pi / 4  # the three lights' angle from the viewing axis
_OFF_COLOUR = 0.25  # share of objects painted any colour instead of their class's
_CHUNK = 256  # scenes rendered at once (about 10 MB per array at 32 × 32)


def _class_colours(num_classes: int) -> np.ndarray:
    """Mean colour of each class, ``(num_classes, 3)``: evenly spaced hues, row 0 unused."""
    hue = (np.arange(num_classes) - 1) / max(num_classes - 1, 1) + 0.05
    pure = np.clip(np.stack([np.abs(6 * hue - 3) - 1, 2 - np.abs(6 * hue - 2), 2 - np.abs(6 * hue - 4)], 1), 0, 1)
    return 0.85 * (0.35 + 0.65 * pure)  # value 0.85, saturation 0.65


def _scene_parameters(rng: np.random.Generator, n: int, num_classes: int, max_objects: int) -> dict:
    """Everything random about ``n`` scenes except the pixel noise, drawn at once.

    Layer 0 is the background, layers 1..K the object slots (K = ``max_objects``); arrays are
    ``(n, K+1, ...)``. Depth planes ``z = near + slope · ((x, y) - centre)`` over the image square
    [-1, 1]²: the background has near in [8, 10] and slopes in [-1.2, 1.2], so z >= 5.6 everywhere;
    objects have near in [2, 4], slopes in [-0.8, 0.8] and reach at most 0.5·√2 from their centre,
    so z <= 5.2 where they are drawn: every object lies in front of the background.
    """
    k = max_objects
    count = rng.integers(1, k + 1, n)  # objects per scene, 1..K
    label = np.concatenate([np.zeros((n, 1), np.int64), rng.integers(1, num_classes, (n, k))], 1)
    # colour: the class's hue with jitter, but a quarter of the objects take any colour, so colour
    # is a strong cue to the class and shape is needed for the rest; the background is about grey
    colour = _class_colours(num_classes)[label] + rng.normal(0, 0.06, (n, k + 1, 3))
    any_colour = rng.random((n, k)) < _OFF_COLOUR
    colour[:, 1:][any_colour] = rng.uniform(0.15, 0.85, (int(any_colour.sum()), 3))
    colour[:, 0] = rng.uniform(0.35, 0.8, (n, 1)) + rng.normal(0, 0.03, (n, 3))
    # one light per colour channel (red, green, blue), 120° apart around the viewing axis, as in
    # photometric stereo: on a grey surface the ratios of the channels tell the normal
    azimuth = np.pi / 2 + 2 * np.pi / 3 * np.arange(3) + rng.normal(0, 0.1, (n, 1))  # (n, 3)
    light = np.stack([np.cos(azimuth) * np.sin(_LIGHT_ELEVATION), np.sin(azimuth) * np.sin(_LIGHT_ELEVATION),
                      np.full_like(azimuth, np.cos(_LIGHT_ELEVATION))], -1)  # (n, 3 channels, 3 xyz)
    direction = rng.uniform(0, np.pi, (n, k + 1))
    par = {
        "label": label,
        "active": np.concatenate([np.ones((n, 1), bool), np.arange(k) < count[:, None]], 1),
        "centre": np.concatenate([np.zeros((n, 1, 2)), rng.uniform(-0.75, 0.75, (n, k, 2))], 1),
        "near": np.concatenate([rng.uniform(8, 10, (n, 1)), rng.uniform(2, 4, (n, k))], 1),
        "slope": np.concatenate([rng.uniform(-1.2, 1.2, (n, 1, 2)), rng.uniform(-0.8, 0.8, (n, k, 2))], 1),
        "scale": rng.uniform(0.25, 0.5, (n, k)),  # radius of the shape's unit frame
        "angle": rng.uniform(0, 2 * np.pi, (n, k)),
        "aspect": rng.uniform(0.55, 1.0, (n, k)),  # height / width of rectangles
        "colour": np.clip(colour, 0.05, 0.95),
        "light": light,
        # surface texture: stripes with wave vector (4..8)·(cos, sin)(direction) and a phase
        "wave": rng.uniform(4, 8, (n, k + 1, 1)) * np.stack([np.cos(direction), np.sin(direction)], -1),
        "phase": rng.uniform(0, 2 * np.pi, (n, k + 1)),
    }
    return {name: a.astype(np.float32) if a.dtype == np.float64 else a for name, a in par.items()}


def _inside_shape(shape: int, p: np.ndarray, q: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    """Whether the points ``(p, q)`` of each object's own frame lie in shape ``SCENE_SHAPES[shape]``
    (about unit radius; ``aspect`` ``(M, 1, 1)`` squeezes the rectangle). All arrays ``(M, H, W)``."""
    if shape == 0:  # disc
        return p * p + q * q <= 1
    if shape == 1:  # rectangle
        return (np.abs(p) <= 1) & (np.abs(q) <= aspect)
    if shape == 2:  # equilateral triangle with corners at radius 1.3 (about the disc's area)
        return (q >= -0.65) & (q <= 1.3 - np.sqrt(3) * np.abs(p))
    if shape == 3:  # ring
        return (p * p + q * q <= 1) & (p * p + q * q >= 0.45**2)
    return ((np.abs(p) <= 1) & (np.abs(q) <= 0.3)) | ((np.abs(q) <= 1) & (np.abs(p) <= 0.3))  # cross


def _layer_depths(par: dict, grid: np.ndarray) -> np.ndarray:
    """Depth of every layer at every pixel, ``inf`` where a layer is absent: ``(n, K+1, H, W)``."""
    dx = grid[None, None, None, :] - par["centre"][..., 0, None, None]  # (n, K+1, 1, W)
    dy = grid[None, None, :, None] - par["centre"][..., 1, None, None]  # (n, K+1, H, 1)
    slope_x, slope_y = par["slope"][..., 0, None, None], par["slope"][..., 1, None, None]
    z = par["near"][..., None, None] + slope_x * dx + slope_y * dy  # (n, K+1, H, W)
    # each object's own frame: rotate by its angle, divide by its scale
    cos, sin, scale = (a[..., None, None] for a in (np.cos(par["angle"]), np.sin(par["angle"]), par["scale"]))
    p = (cos * dx[:, 1:] + sin * dy[:, 1:]) / scale  # (n, K, H, W)
    q = (cos * dy[:, 1:] - sin * dx[:, 1:]) / scale
    shape = (par["label"][:, 1:] - 1) % len(SCENE_SHAPES)
    inside = np.zeros(p.shape, bool)
    for s in np.unique(shape):
        m = shape == s
        inside[m] = _inside_shape(int(s), p[m], q[m], par["aspect"][m][:, None, None])
    drawn = np.concatenate([np.ones_like(inside[:, :1]), inside & par["active"][:, 1:, None, None]], 1)
    return np.where(drawn, z, np.inf).astype(np.float32)


def _normals_np(depth: np.ndarray, pixel_size: float) -> np.ndarray:
    """NumPy twin of :func:`normals_from_depth` (the generator stays in NumPy, which is faster here)."""
    dz_dy, dz_dx = np.gradient(depth, pixel_size, axis=(2, 3))
    normals = np.concatenate([-dz_dx, -dz_dy, np.ones_like(dz_dx)], 1)  # (n, 3, H, W)
    return normals / np.sqrt((normals * normals).sum(1, keepdims=True))


def _boundaries_np(segmentation: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`boundaries_from_segmentation`."""
    edge = np.zeros(segmentation.shape, bool)
    across = segmentation[:, :, 1:] != segmentation[:, :, :-1]
    edge[:, :, 1:] |= across
    edge[:, :, :-1] |= across
    down = segmentation[:, 1:, :] != segmentation[:, :-1, :]
    edge[:, 1:, :] |= down
    edge[:, :-1, :] |= down
    return edge[:, None].astype(np.float32)


def _render(par: dict, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Images and targets of the scenes in ``par`` (NumPy), in the order of :class:`DenseScenes`."""
    grid = ((np.arange(size) + 0.5) * 2 / size - 1).astype(np.float32)  # pixel centres in [-1, 1]
    z = _layer_depths(par, grid)
    objects = z[:, 1:][np.isfinite(z[:, 1:])]
    assert objects.max(initial=0) < z[:, 0].min(), "an object reaches behind the background"
    visible = z.argmin(1)  # (n, H, W): the nearest layer is drawn on top
    scene = np.arange(len(visible))[:, None, None]
    depth = np.take_along_axis(z, visible[:, None], 1)  # (n, 1, H, W)
    normals = _normals_np(depth, 2 / size)
    segmentation = par["label"][scene, visible]  # (n, H, W)
    # 1. albedo with stripes whose frequency grows with depth, as a texture does under perspective
    wave = par["wave"][scene, visible]  # (n, H, W, 2)
    along = (wave[..., 0] * grid[None, None, :] + wave[..., 1] * grid[None, :, None]) * depth[:, 0] / 5
    stripes = np.sin(along + par["phase"][scene, visible])[:, None]  # (n, 1, H, W)
    albedo = par["colour"][scene, visible].transpose(0, 3, 1, 2) * (1 + 0.1 * stripes)  # (n, 3, H, W)
    # 2. Lambert shading by the normals, each channel by its own light, 3. haze that grows with
    # depth, 4. sensor noise
    shade = 0.25 + 0.75 * np.maximum(np.einsum("nchw,nkc->nkhw", normals, par["light"]), 0)  # (n, 3, H, W)
    keep = np.exp(-depth / _HAZE_DEPTH)
    noise = 0.02 * rng.standard_normal(albedo.shape, dtype=np.float32)
    image = albedo * shade * keep + _HAZE[:, None, None] * (1 - keep) + noise
    return np.clip(image, 0, 1), segmentation, depth, normals, _boundaries_np(segmentation)


def make_dense_scenes(n: int, size: int = 32, seed: int = 0, num_classes: int = 4,
                      max_objects: int = 4) -> DenseScenes:
    """``n`` generated scenes of ``size × size`` pixels with segmentation, depth, normals and boundaries.

    Each scene is a background plane (class 0) tilted in depth, with 1..``max_objects`` flat objects
    in front of it. An object of class c in 1..``num_classes``-1 has the shape
    ``SCENE_SHAPES[(c - 1) % 5]`` (disc, rectangle, triangle, ring, cross) at a random place, size
    and angle, and a tilted depth plane of its own; where objects overlap, the nearer one is drawn.
    Three objects in four take a colour near their class's hue and the rest any colour, so colour is a strong cue to the class but not a sufficient one; the background is about
    grey. The image is albedo with stripes that get finer with depth, times Lambert shading by three
    lights, red, green and blue from three sides (so the tint of a surface tells its normal, as in
    photometric stereo), faded toward a haze colour with depth (so brightness tells depth), plus
    Gaussian noise (sd 0.02).
    The targets follow from the depth map: ``normals = normals_from_depth(depth, pixel_size=2 / size)``
    (the image spans [-1, 1]) and ``boundaries = boundaries_from_segmentation(segmentation)``.
    The same seed gives the same tensors. Introduced in Chapter 7.
    """
    check_count("n", n, 2000)
    check_count("size", size, 32)
    check_count("num_classes", num_classes, 4)
    check_count("max_objects", max_objects, 4)
    if size < 8:
        raise ValueError(f"size={size} is too small; use at least 8 pixels per side, e.g. size=32.")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} leaves no object class; use at least 2, e.g. num_classes=4.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed={seed!r} must be a non-negative integer, e.g. seed=0.")
    rng = np.random.default_rng(seed)
    par = _scene_parameters(rng, n, num_classes, max_objects)
    chunks = [_render({k: v[i : i + _CHUNK] for k, v in par.items()}, size, rng) for i in range(0, n, _CHUNK)]
    images, segmentation, depth, normals, boundaries = (np.concatenate(parts) for parts in zip(*chunks))
    return DenseScenes(*map(torch.from_numpy, (images, segmentation, depth, normals, boundaries)),
                       num_classes=num_classes)


def dense_scene_split(n_train: int = 2000, n_test: int = 500, size: int = 32, seed: int = 0,
                      num_classes: int = 4, max_objects: int = 4) -> tuple[DenseScenes, DenseScenes]:
    """Train and test :class:`DenseScenes` from :func:`make_dense_scenes` with the seeds ``2·seed``
    and ``2·seed + 1``, so no two splits of any seeds share a generator. Introduced in Chapter 7.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed={seed!r} must be a non-negative integer, e.g. seed=0.")
    return (make_dense_scenes(n_train, size, 2 * seed, num_classes, max_objects),
            make_dense_scenes(n_test, size, 2 * seed + 1, num_classes, max_objects))


# ----------------------------------------------------------------------------- NYUD-v2 (Chapter 7)
# NYUD-v2 in the multi-task layout of MTI-Net (Vandenhende et al. 2020), which ATRC and InvPT reuse:
# one archive NYUD_MT.tgz (about 4 GB) on Google Drive. Its sha256 is not recorded yet, and fetch
# verifies every file, so download=True refuses until someone downloads it once, checks it, and adds
# REGISTRY["nyud"] = [RemoteFile(NYUD_ARCHIVE_URL, "NYUD_MT.tgz", "<its sha256>")].
NYUD_PAGE = "https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw/view"
NYUD_ARCHIVE_URL = ("https://drive.usercontent.google.com/download"
                    "?id=14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw&export=download&confirm=t")
_NYUD_SPLITS = ("train", "val")


def _nyud_folder(root: Path) -> Path:
    """``root/NYUD_MT`` if it is there, else ``root`` itself if it holds ``gt_sets/``."""
    if not (root / "NYUD_MT").is_dir() and (root / "gt_sets").is_dir():
        return root
    return root / "NYUD_MT"


def _download_nyud(root: Path) -> None:
    """Fetch ``NYUD_MT.tgz`` through :func:`fetch` (sha256-checked) and unpack it to ``root/NYUD_MT``."""
    if "nyud" not in REGISTRY:
        raise NotImplementedError(
            "download=True cannot fetch NYUD-v2 yet, because effnb.data records no sha256 for its archive "
            f"and downloads nothing it cannot verify; download NYUD_MT.tgz from {NYUD_PAGE} yourself and "
            f"extract it into {root}."
        )
    if (root / "NYUD_MT").exists():
        raise FileExistsError(f"{root / 'NYUD_MT'} exists but is incomplete; move it away and download again.")
    (archive,) = fetch("nyud", root, download=True)
    # unpack beside the target, then rename: an interrupted unpack leaves no half NYUD_MT behind
    with tempfile.TemporaryDirectory(dir=root, prefix=".NYUD_MT.") as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        if not (Path(tmp) / "NYUD_MT" / "gt_sets").is_dir():
            raise ValueError(f"{archive} holds no NYUD_MT/gt_sets folder; is it MTI-Net's NYUD_MT.tgz?")
        os.replace(Path(tmp) / "NYUD_MT", root / "NYUD_MT")


def _nyud_paths(folder: Path, split: str) -> list[dict[str, Path]]:
    """For each id in ``gt_sets/<split>.txt``, the path of each of its five files; raises if one is missing."""
    listing = folder / "gt_sets" / f"{split}.txt"
    rows = []
    for image_id in listing.read_text().split():
        row = {"image": folder / "images" / f"{image_id}.jpg",
               "segmentation": folder / "segmentation" / f"{image_id}.png",
               "depth": folder / "depth" / f"{image_id}.npy"}
        for task in ("normals", "edge"):  # .npy in MTI-Net's release; .png also works
            npy = folder / task / f"{image_id}.npy"
            row[task] = npy if npy.exists() else npy.with_suffix(".png")
        missing = [path for path in row.values() if not path.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing, but {listing} lists the id {image_id!r}; "
                                    "restore the file or remove the id from the list.")
        rows.append(row)
    return rows


def _read_nyud_sample(row: dict[str, Path]) -> list[torch.Tensor]:
    """One NYUD sample at its stored size, each ``(1, C, H, W)``: image, segmentation (as float),
    depth, normals, edge."""
    from PIL import Image

    def read(task: str, mode: str | None = None) -> np.ndarray:
        if row[task].suffix == ".npy":
            return np.load(row[task]).astype(np.float32)  # np.load refuses pickled objects
        with Image.open(row[task]) as picture:
            return np.asarray(picture.convert(mode) if mode else picture).astype(np.float32)

    image = read("image", "RGB") / 255  # (H, W, 3)
    labels = read("segmentation")  # (H, W): 0 unlabelled, 1..40 the classes
    normals = read("normals", "RGB")  # (H, W, 3)
    if row["normals"].suffix == ".png":
        normals = 2 * normals / 255 - 1  # the RGB encoding n = 2·rgb/255 − 1
    edge = read("edge", "L")
    edge = edge / 255 if row["edge"].suffix == ".png" else edge
    maps = [image, labels, read("depth"), normals, edge]
    if any(m.shape[:2] != image.shape[:2] for m in maps):
        raise ValueError(f"the files of {row['image'].stem} differ in size ({[m.shape[:2] for m in maps]}); "
                         "each id's image and maps must have one height and width.")
    return [torch.from_numpy(m.reshape(*m.shape[:2], -1)).permute(2, 0, 1)[None] for m in maps]


def _resize_sample(maps: list[torch.Tensor], size: tuple[int, int] | None) -> list[torch.Tensor]:
    """Resize one sample's maps: bilinear for image, depth and normals, nearest for segmentation and edge."""
    image, labels, depth, normals, edge = maps
    if size is not None and tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size, mode="bilinear", align_corners=False).clamp(0, 1)
        depth = F.interpolate(depth, size, mode="bilinear", align_corners=False)
        normals = F.interpolate(normals, size, mode="bilinear", align_corners=False)
        labels, edge = (F.interpolate(m, size, mode="nearest-exact") for m in (labels, edge))
    normals = normals / normals.norm(dim=1, keepdim=True).clamp(min=1e-6)  # unit length; zeros stay zero
    return [image, labels, depth, normals, edge]


def load_nyud(root: str | Path, split: str = "train", size: int | tuple[int, int] | None = None,
              download: bool = False) -> DenseScenes:
    """NYUD-v2 (795 train, 654 val images of 425 × 560) as :class:`DenseScenes`, from the multi-task
    layout of MTI-Net, ATRC and InvPT under ``root/NYUD_MT`` (or ``root`` itself).

    Files per id listed in ``gt_sets/<split>.txt``: ``images/ID.jpg``; ``segmentation/ID.png``
    (0 unlabelled, 1..40 the classes); ``depth/ID.npy`` (metres); ``normals/ID.npy`` (``(H, W, 3)``
    vectors) or ``normals/ID.png`` (n = 2·rgb/255 − 1); ``edge/ID.npy`` (0/1) or ``edge/ID.png``
    (0/255). Classes 1..40 become 0..39 and unlabelled pixels ``ignore_index = 255``, as in ATRC
    and MTI-Net, so ``F.cross_entropy(..., ignore_index=255)`` skips them; normals are rescaled to
    unit length and edges thresholded at 0.5. ``size`` (an int for a square, or ``(H, W)``) resizes
    each image as it is read: bilinear for the image, depth and normals, nearest for segmentation
    and edges (thin edges can vanish when shrinking a lot); at full size the train split takes about
    8 GB of memory. ``download=True`` fetches only what is missing, and only once the archive's
    sha256 is recorded in :data:`REGISTRY` (until then it raises ``NotImplementedError``).
    Introduced in Chapter 7.
    """
    check_choice("split", split, _NYUD_SPLITS)
    shape = (size, size) if isinstance(size, int) else size
    if shape is not None and not (isinstance(shape, tuple) and len(shape) == 2
                                  and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise ValueError(f"size={size!r} must be a positive int, a pair (height, width) of them, or None.")
    root = Path(root)
    folder = _nyud_folder(root)
    listing = folder / "gt_sets" / f"{split}.txt"
    if not listing.exists() and download:
        _download_nyud(root)
        folder = root / "NYUD_MT"
    elif not listing.exists():
        how = " or pass download=True (needs internet)" if "nyud" in REGISTRY else ""
        raise FileNotFoundError(
            f"{listing} is missing; extract NYUD_MT.tgz (MTI-Net's NYUD-v2, {NYUD_PAGE}) into {root} "
            f"so that it holds NYUD_MT/images, segmentation, depth, normals, edge and gt_sets{how}."
        )
    samples = [_resize_sample(_read_nyud_sample(row), shape) for row in _nyud_paths(folder, split)]
    if not samples:
        raise ValueError(f"{listing} lists no ids; it should hold one image id per line.")
    if len({tuple(s[0].shape) for s in samples}) > 1:
        raise ValueError("the NYUD images differ in size; pass size=(H, W) to resize them to one size.")
    image, labels, depth, normals, edge = (torch.cat(parts) for parts in zip(*samples))
    labels = labels[:, 0].long()
    segmentation = torch.where(labels == 0, 255, labels - 1)  # (N, H, W)
    boundaries = (edge >= 0.5).float()
    return DenseScenes(image, segmentation, depth, normals, boundaries, num_classes=40, ignore_index=255)


# --- multi-spectral neuron volumes (Chapter 10) ------------------------------------------------

PLANES = {"xy": 0, "zy": 2, "xz": 1}
"""A tracking plane and the volume axis (of z, y, x) a tracer steps along when it tracks in that plane."""


@dataclass(frozen=True)
class StartBox:
    """Where a tracer starts: the plane it tracks in, the box centre (z, y, x), its side, and the step direction."""

    plane: str
    centre: tuple[float, float, float]
    size: int
    direction: int


@dataclass
class NeuronVolume:
    """A multi-spectral (Brainbow-like) volume with its ground truth.

    ``image`` is ``(Z, Y, X, 3)`` float32 in [0, 1]; ``neurons`` holds one SWC table per neuron
    (``(N, 7)``: id, type, x, y, z, radius, parent; parent -1 at the root, positions in voxels);
    ``starts`` one :class:`StartBox` per neuron, at its root; ``colours`` each neuron's colour at
    its root. Introduced in Chapter 10.
    """

    image: np.ndarray
    neurons: list[np.ndarray]
    starts: list[StartBox]
    colours: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(self.image.shape[:3])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _walk(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, shape: tuple[int, ...],
          turn_to: np.ndarray | None, wobble: float, margin: float, max_steps: int) -> np.ndarray:
    """Points one voxel apart from ``start`` along a smooth curve until it leaves the volume (less ``margin``).

    The heading follows ``direction``, bends smoothly toward ``turn_to`` (if given) over a random stretch,
    and wobbles by a slowly varying random perpendicular push of size ``wobble``.
    """
    points, heading, push = [start.astype(float)], _unit(direction.astype(float)), np.zeros(3)
    bend_at, bend_len = rng.uniform(0.25, 0.5) * min(shape), rng.uniform(10, 20)
    upper = np.array(shape, float) - 1 - margin
    for step in range(1, max_steps):
        push = 0.9 * push + 0.1 * rng.normal(0, wobble, 3)
        goal = direction
        if turn_to is not None:
            s = np.clip((step - bend_at) / bend_len, 0, 1)
            goal = (1 - s) * direction + s * turn_to
        heading = _unit(0.7 * heading + 0.3 * _unit(goal) + push)
        nxt = points[-1] + heading
        if np.any(nxt < margin) or np.any(nxt > upper):
            break
        points.append(nxt)
    return np.array(points)


def _neuron_curves(rng: np.random.Generator, shape: tuple[int, ...], anchor: np.ndarray, direction: np.ndarray,
                   turn: bool, branch: bool, margin: float) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """A neuron's main curve through ``anchor`` (root at one end, on the volume's edge) and its branches.

    Returns the main curve (points, root first) and a list of (index of the branch point on it, branch curve).
    """
    turn_to = None
    if turn:
        axes = [a for a in range(3) if a != int(np.argmax(np.abs(direction)))]
        turn_to = np.zeros(3)
        turn_to[rng.choice(axes)] = rng.choice([-1.0, 1.0])
    forward = _walk(rng, anchor, direction, shape, turn_to, 0.15, margin, 4 * max(shape))
    backward = _walk(rng, anchor, -direction, shape, None, 0.15, margin, 4 * max(shape))
    main = np.concatenate([backward[::-1], forward[1:]])
    branches = []
    if branch and len(main) > 30:
        at = int(rng.integers(len(main) // 3, 2 * len(main) // 3))
        local = _unit(main[min(at + 2, len(main) - 1)] - main[max(at - 2, 0)])
        side = _unit(np.cross(local, rng.normal(size=3)))
        start = main[at] + 2.0 * side                                          # leave the parent's tube first
        curve = _walk(rng, start, _unit(local + 1.2 * side), shape, None, 0.1, margin, 60)
        if len(curve) > 12:
            branches.append((at, np.concatenate([main[at:at + 1], curve])))
    return main, branches


def _paint(field: np.ndarray, colour_field: np.ndarray, points: np.ndarray, radii: np.ndarray,
           colours: np.ndarray) -> None:
    """Draw a tube: at each voxel, the brightest of the Gaussian profiles exp(-(d/r)^2) of the points, and its colour."""
    shape = np.array(field.shape)
    for p, r, c in zip(points, radii, colours):
        lo = np.maximum(np.floor(p - 2.5 * r).astype(int), 0)
        hi = np.minimum(np.ceil(p + 2.5 * r).astype(int) + 1, shape)
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        w = np.exp(-((grid - p) ** 2).sum(-1) / r**2)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        brighter = w > field[box]
        field[box] = np.where(brighter, w, field[box])
        colour_field[box] = np.where(brighter[..., None], c, colour_field[box])


def _swc_table(main: np.ndarray, branches: list[tuple[int, np.ndarray]], radii: list[np.ndarray]) -> np.ndarray:
    """SWC rows (id, type 3, x, y, z, radius, parent) of a main curve and its branches; ids from 1."""
    rows = [[i + 1, 3, p[2], p[1], p[0], radii[0][i], i if i else -1] for i, p in enumerate(main)]
    for (at, curve), r in zip(branches, radii[1:]):
        first = len(rows) + 1
        rows += [[first + k - 1, 3, p[2], p[1], p[0], r[k], (at + 1) if k == 1 else first + k - 2]
                 for k, p in enumerate(curve) if k > 0]
    return np.array(rows, dtype=np.float64)


_COLOUR_TRIES = 10_000   # draws for a neuron colour at least 0.5 from the others before taking the farthest


def make_neuron_volume(shape: tuple[int, int, int] = (48, 96, 96), n_neurons: int = 6, seed: int = 0, *,
                       radius: tuple[float, float] = (1.6, 2.4), branch_fraction: float = 0.5,
                       cross_fraction: float = 0.5, turn_fraction: float = 0.5, colour_drift: float = 0.01,
                       blur: float = 0.7, noise: float = 0.05) -> NeuronVolume:
    """Generate a Brainbow-like volume of tubular neurons with their SWC ground truth (deterministic from ``seed``).

    Each neuron is a smooth curve from one face of the volume to another, some bending into another axis
    (``turn_fraction``), some with a branch (``branch_fraction``), some passing through an earlier neuron
    (``cross_fraction``: a crossing). Each has its own saturated colour (at least 0.5 from the others' in RGB
    where 10,000 draws find one; in a crowded volume, the farthest draw), which drifts along it by a random
    walk of ``colour_drift`` per voxel; the volume is blurred (``blur``, voxels) and gets Gaussian
    ``noise``. The tracer's start box sits at each neuron's root, in the plane across its first direction.
    Introduced in Chapter 10.
    """
    if len(shape) != 3 or any(not isinstance(s, int) or s < 16 for s in shape):
        raise ValueError(f"shape={shape!r} must be three whole numbers >= 16 (Z, Y, X), e.g. shape=(48, 96, 96).")
    check_count("n_neurons", n_neurons, 6)
    for name, value in [("branch_fraction", branch_fraction), ("cross_fraction", cross_fraction),
                        ("turn_fraction", turn_fraction)]:
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} must lie in [0, 1], e.g. {name}=0.5.")
    rng = np.random.default_rng(seed)
    dims, margin = np.array(shape, float), 2.0
    image = np.zeros((*shape, 3), np.float32)
    neurons, starts, colours, mains = [], [], [], []
    for k in range(n_neurons):
        best, farthest = None, -1.0                                  # a saturated colour unlike the others
        for _ in range(_COLOUR_TRIES):
            colour = rng.dirichlet([0.4, 0.4, 0.4])
            colour = colour / colour.max()
            gap = min((np.linalg.norm(colour - c) for c in colours), default=np.inf)
            if gap > 0.5:
                break
            if gap > farthest:
                best, farthest = colour, gap
        else:                                                        # many neurons: the palette is full, so take
            colour = best                                            # the draw farthest from the colours so far
        crossing = k > 0 and rng.random() < cross_fraction
        if crossing:                                                 # pass through a point of an earlier neuron
            other = mains[int(rng.integers(len(mains)))]
            at = int(rng.integers(len(other) // 4, 3 * len(other) // 4))
            anchor = other[at]
            local = _unit(other[min(at + 2, len(other) - 1)] - other[max(at - 2, 0)])
            direction = _unit(np.cross(local, rng.normal(size=3)))
        else:
            anchor = rng.uniform(0.25, 0.75, 3) * dims
            direction = np.zeros(3)
            direction[rng.integers(3)] = 1.0
            direction = _unit(direction + rng.normal(0, 0.25, 3))
        main, branches = _neuron_curves(rng, shape, anchor, direction, rng.random() < turn_fraction,
                                        rng.random() < branch_fraction, margin)
        mains.append(main)
        curves = [main] + [c for _, c in branches]
        radii = [np.full(len(c), rng.uniform(*radius)) for c in curves]
        field, colour_field = np.zeros(shape, np.float32), np.zeros((*shape, 3), np.float32)
        for curve, r in zip(curves, radii):
            drift = np.cumsum(rng.normal(0, colour_drift, (len(curve), 3)), 0)
            _paint(field, colour_field, curve, r, np.clip(colour + drift, 0.05, 1.0))
        image += field[..., None] * colour_field
        neurons.append(_swc_table(main, branches, radii))
        starts.append(start_box(neurons[-1]))
        colours.append(colour)
    if blur > 0:
        from scipy.ndimage import gaussian_filter

        image = gaussian_filter(image, sigma=(blur, blur, blur, 0))
    image = np.clip(image + rng.normal(0, noise, image.shape), 0, 1).astype(np.float32)
    return NeuronVolume(image, neurons, starts, np.array(colours))


def start_box(table: np.ndarray, ahead: int = 5) -> StartBox:
    """The start box of a neuron given as an SWC table: at its root, in the plane across the direction to the node
    ``ahead`` steps on (the plane whose stepping axis that direction follows most), ~5 radii wide (odd).
    Introduced in Chapter 10."""
    table = np.asarray(table)
    points = table[:, [4, 3, 2]]
    to = points[min(ahead, len(points) - 1)] - points[0]
    axis = int(np.argmax(np.abs(to)))
    plane = {0: "xy", 2: "zy", 1: "xz"}[axis]
    size = int(2 * round(2.5 * float(table[0, 5])) + 1)
    return StartBox(plane, tuple(float(v) for v in points[0]), max(size, 5), int(np.sign(to[axis])) or 1)


SWC_HEADER = "# id type x y z radius parent"


def write_swc(path: str | Path, table: np.ndarray) -> None:
    """Write an SWC table (``(N, 7)``: id, type, x, y, z, radius, parent) as text. Introduced in Chapter 10."""
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[1] != 7:
        raise ValueError(f"an SWC table has 7 columns (id, type, x, y, z, radius, parent); got shape {table.shape}.")
    lines = [SWC_HEADER] + [f"{int(r[0])} {int(r[1])} {r[2]:.3f} {r[3]:.3f} {r[4]:.3f} {r[5]:.3f} {int(r[6])}"
                            for r in table]
    Path(path).write_text("\n".join(lines) + "\n")


def read_swc(path: str | Path) -> np.ndarray:
    """Read an SWC file into an ``(N, 7)`` float array (id, type, x, y, z, radius, parent); ``#`` lines are comments.

    Raises one sentence naming the file and line when a row does not have 7 numbers. Introduced in Chapter 10.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SWC file at {path}; pass the path of an existing .swc file.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        if len(values) != 7:
            raise ValueError(f"{path}, line {number}: an SWC row has 7 numbers (id type x y z radius parent); "
                             f"got {line!r}.")
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def read_tiff_stack(path: str | Path, channel_axis: int | None = None) -> np.ndarray:
    """Read a multi-channel TIFF stack as a ``(Z, Y, X, C)`` float32 array in [0, 1] (needs ``tifffile``).

    ``channel_axis`` says where the channels are in the file's array (default: the last axis when it has
    at most 4 entries, else axis 1, as ImageJ writes ZCYX); a 3-D stack is read as one channel. Integer
    data is divided by its type's maximum, floats by their largest value. Introduced in Chapter 10.
    """
    try:
        import tifffile
    except ImportError:
        raise ImportError("reading TIFF stacks needs tifffile: pip install tifffile") from None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no TIFF stack at {path}; pass the path of an existing .tif file.")
    data = tifffile.imread(path)
    if data.ndim == 3:
        data = data[..., None]
    elif data.ndim == 4:
        axis = channel_axis if channel_axis is not None else (3 if data.shape[3] <= 4 else 1)
        data = np.moveaxis(data, axis, -1)
    else:
        raise ValueError(f"{path} holds a {data.ndim}-D array; a stack is Z x Y x X with an optional channel axis.")
    if np.issubdtype(data.dtype, np.integer):
        return (data / np.iinfo(data.dtype).max).astype(np.float32)
    return (data / max(float(data.max()), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- question scenes (Chapter 9)
QUESTION_TYPES = ("how many objects?", "is there a {colour} object?", "what shape is {quadrant}?",
                  "what colour is the object {quadrant}?")
QUESTION_COLOURS = ("red", "green", "blue", "yellow")
QUESTION_SHAPES = ("disc", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ANSWERS = ("1", "2", "3", "4", "no", "yes", *QUESTION_SHAPES, *QUESTION_COLOURS, "nothing")
_RGB = np.array([[0.95, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.3, 1.0], [0.95, 0.85, 0.1]], np.float32)
_SHAPE_OF = (0, 1, 2)  # disc, rectangle, triangle of _inside_shape


@dataclass(frozen=True)
class QuestionScenes:
    """Scenes of up to four objects (one per quadrant) with one question and its answer each.

    ``images`` ``(N, 3, S, S)`` float32 in [0, 1]; ``objects`` ``(N, S, S)`` int64, 0 for background and
    ``1 + 4 * shape + colour`` on an object; ``shapes`` and ``colours`` ``(N, 4)`` int64 per quadrant
    (:data:`QUADRANTS` order), -1 where the quadrant is empty; ``question`` ``(N, 2)`` int64: the type
    (index into :data:`QUESTION_TYPES`) and its argument (a colour for type 1, a quadrant for types 2
    and 3, 0 otherwise); ``answer`` ``(N,)`` int64 index into :data:`ANSWERS`. Introduced in Chapter 9.
    """

    images: torch.Tensor
    objects: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor
    question: torch.Tensor
    answer: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index) -> QuestionScenes:
        """The scenes at ``index`` (a slice, a list of ints, an int or bool tensor)."""
        return QuestionScenes(*(getattr(self, name)[index] for name in
                                ("images", "objects", "shapes", "colours", "question", "answer")))

    def question_text(self, i: int) -> str:
        """Scene ``i``'s question in words, e.g. ``what shape is top left?``."""
        kind, arg = (int(v) for v in self.question[i])
        return QUESTION_TYPES[kind].format(colour=QUESTION_COLOURS[arg], quadrant=QUADRANTS[arg])

    def patch_labels(self, patch: int) -> torch.Tensor:
        """The object label of each ``patch`` × ``patch`` patch, ``(N, (S/patch)²)`` in row-major order:
        the most common object label among its pixels if objects cover at least a quarter of it, else 0."""
        n, s = self.objects.shape[0], self.objects.shape[1]
        if s % patch:
            raise ValueError(f"patch={patch} must divide the image size {s}, e.g. patch={s // 8}.")
        g = s // patch
        cells = self.objects.view(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)
        counts = F.one_hot(cells, 1 + 4 * len(QUESTION_SHAPES)).sum(2)  # (N, P, labels)
        label = counts[..., 1:].argmax(-1) + 1
        covered = counts[..., 1:].sum(-1) * 4 >= patch * patch
        return torch.where(covered, label, torch.zeros_like(label))


def _answers(shapes: np.ndarray, colours: np.ndarray, question: np.ndarray) -> np.ndarray:
    """The index into :data:`ANSWERS` of each scene's answer."""
    kind, arg = question[:, 0], question[:, 1]
    rows = np.arange(len(kind))
    at_shape, at_colour = shapes[rows, arg], colours[rows, arg]
    nothing = ANSWERS.index("nothing")
    return np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3],
        [(shapes >= 0).sum(1) - 1,
         np.where((colours == arg[:, None]).any(1), ANSWERS.index("yes"), ANSWERS.index("no")),
         np.where(at_shape >= 0, ANSWERS.index("disc") + at_shape, nothing),
         np.where(at_colour >= 0, ANSWERS.index("red") + at_colour, nothing)])


def make_question_scenes(n: int, size: int = 32, seed: int = 0, occupancy: float = 0.5) -> QuestionScenes:
    """``n`` scenes of ``size`` × ``size`` pixels: each quadrant holds an object with probability
    ``occupancy`` (at least one per scene), a disc, square or triangle in red, green, blue or yellow, of
    radius 0.14-0.2 of ``size``, on a dark noisy background; one question per scene, its type drawn
    uniformly. Deterministic from ``seed``. Returns :class:`QuestionScenes`. Introduced in Chapter 9.
    """
    check_count("n", n, 1000)
    check_count("size", size, 32)
    if size < 16 or size % 2:
        raise ValueError(f"size={size} must be an even number >= 16 (two quadrants per side), e.g. size=32.")
    if not 0 < occupancy <= 1:
        raise ValueError(f"occupancy={occupancy!r} is the chance that a quadrant holds an object; use 0 < occupancy <= 1.")
    rng = np.random.default_rng(seed)
    occupied = rng.random((n, 4)) < occupancy
    occupied[np.arange(n), rng.integers(0, 4, n)] |= ~occupied.any(1)
    shapes = np.where(occupied, rng.integers(0, len(QUESTION_SHAPES), (n, 4)), -1)
    colours = np.where(occupied, rng.integers(0, len(QUESTION_COLOURS), (n, 4)), -1)
    radius = rng.uniform(0.14, 0.2, (n, 4)) * size
    cell = size / 2
    offset = rng.uniform(radius + 1, cell - radius - 1)  # (n, 4) centre within the cell, one draw per axis
    offset = np.stack([offset, rng.uniform(radius + 1, cell - radius - 1)], -1)
    quad = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    centre = quad[None] * cell + offset  # (n, 4, 2) as (row, column)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = rng.normal(0.08, 0.03, (n, size, size, 3)).astype(np.float32)
    objects = np.zeros((n, size, size), np.int64)
    for q in range(4):
        p = (cols[None] - centre[:, q, 1, None, None]) / radius[:, q, None, None]
        r = (centre[:, q, 0, None, None] - rows[None]) / radius[:, q, None, None]  # up is positive
        for k in range(len(QUESTION_SHAPES)):
            mask = _inside_shape(_SHAPE_OF[k], p, r, np.ones((n, 1, 1))) & (shapes[:, q] == k)[:, None, None]
            tint = _RGB[np.clip(colours[:, q], 0, None)] * rng.uniform(0.75, 1.0, (n, 1)).astype(np.float32)
            images = np.where(mask[..., None], tint[:, None, None], images)
            objects = np.where(mask, 1 + 4 * k + colours[:, q, None, None], objects)
    images = np.clip(images + rng.normal(0, 0.03, images.shape).astype(np.float32), 0, 1)
    kind = rng.integers(0, len(QUESTION_TYPES), n)
    question = np.stack([kind, np.where(kind == 0, 0, rng.integers(0, 4, n))], 1)
    return QuestionScenes(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(objects),
                          torch.from_numpy(shapes), torch.from_numpy(colours), torch.from_numpy(question),
                          torch.from_numpy(_answers(shapes, colours, question)))
