"""Point clouds: parametric primitives generated offline, and ModelNet40 read from its OFF meshes.

Every cloud is ``(N, 3)`` points sampled uniformly by area on a surface. The generator is
deterministic from its seed. Part of the data layer: it imports only ``config`` and ``data``.
Introduced in Chapter 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from effnb.config import check_choice, check_count
from effnb.data import atomic_path

__all__ = ["MODELNET40_URL", "PointClouds", "ROTATIONS", "SHAPES", "farthest_point_sample", "group_points",
           "load_modelnet40", "make_point_clouds", "normalize_clouds", "point_cloud_split", "random_rotation", "read_off",
           "sample_mesh"]

ROTATIONS = ("z", "so3")

MODELNET40_URL = "http://modelnet.cs.princeton.edu/ModelNet40.zip"


@dataclass(frozen=True)
class PointClouds:
    """Clouds ``points (n, N, 3)`` float32 with class ``labels (n,)`` int64 and the class ``names``."""

    points: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """How many classes ``names`` lists."""
        return len(self.names)

    def to(self, device: torch.device | str) -> PointClouds:
        """The same clouds with ``points`` and ``labels`` on ``device``."""
        return PointClouds(self.points.to(device), self.labels.to(device), self.names)


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform by area on a triangle mesh: ``vertices (V, 3)``, ``faces (F, 3)`` vertex indices.

    A face is drawn with probability proportional to its area, then a point inside it with the
    square-root trick for uniform barycentric coordinates. Raises ``ValueError`` for a mesh of zero area.
    """
    tri = vertices[faces]                                              # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not area.sum() > 0:
        raise ValueError("the mesh has zero surface area; check its faces.")
    face = rng.choice(len(faces), size=n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(n))[:, None], rng.random(n)[:, None]
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    return (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c


def _mesh(vertices: list, faces: list) -> tuple[np.ndarray, np.ndarray]:
    return np.array(vertices, dtype=np.float64), np.array(faces, dtype=np.int64)


_CUBE = _mesh([[x, y, z] for x in (-0.7, 0.7) for y in (-0.7, 0.7) for z in (-0.7, 0.7)],
              [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
               [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
_PYRAMID = _mesh([[-0.8, -0.8, -0.6], [0.8, -0.8, -0.6], [0.8, 0.8, -0.6], [-0.8, 0.8, -0.6], [0, 0, 0.9]],
                 [[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
_PLANE = _mesh([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], [[0, 1, 2], [0, 2, 3]])


def _on_circle(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, 2 * np.pi, n)
    return np.cos(angle), np.sin(angle)


def _sphere(n: int, rng: np.random.Generator, radius: float = 0.9) -> np.ndarray:
    p = rng.normal(size=(n, 3))
    return radius * p / np.linalg.norm(p, axis=1, keepdims=True)


def _tube(n: int, rng: np.random.Generator, radius: float, half_height: float, caps: str) -> np.ndarray:
    """A cylinder side of ``radius`` from -half_height to half_height, with flat or round caps, uniform by area."""
    side, cap = 2 * np.pi * radius * 2 * half_height, (np.pi * radius ** 2 if caps == "flat" else 2 * np.pi * radius ** 2)
    on_side = rng.random(n) < side / (side + 2 * cap)
    c, s = _on_circle(n, rng)
    p = np.stack([radius * c, radius * s, rng.uniform(-half_height, half_height, n)], 1)
    top = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    if caps == "flat":
        r = radius * np.sqrt(rng.random(n))
        cap_points = np.stack([r * c, r * s, top * half_height], 1)
    else:
        dome = _sphere(n, rng, radius)
        dome[:, 2] = np.abs(dome[:, 2]) * top + top * half_height
        cap_points = dome
    return np.where(on_side[:, None], p, cap_points)


def _cone(n: int, rng: np.random.Generator, radius: float = 0.8, height: float = 1.6) -> np.ndarray:
    slant = np.hypot(radius, height)
    lateral, base = np.pi * radius * slant, np.pi * radius ** 2
    on_side = rng.random(n) < lateral / (lateral + base)
    c, s = _on_circle(n, rng)
    t = np.sqrt(rng.random(n))                                      # distance from the apex, uniform by area
    side = np.stack([t * radius * c, t * radius * s, height / 2 - t * height], 1)
    r = radius * np.sqrt(rng.random(n))
    bottom = np.stack([r * c, r * s, np.full(n, -height / 2)], 1)
    return np.where(on_side[:, None], side, bottom)


def _torus(n: int, rng: np.random.Generator, big: float = 0.65, small: float = 0.25) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi, 4 * n)
    phi = rng.uniform(0, 2 * np.pi, 4 * n)
    keep = rng.random(4 * n) < (big + small * np.cos(phi)) / (big + small)   # area element (R + r cos phi)
    theta, phi = theta[keep][:n], phi[keep][:n]
    ring = big + small * np.cos(phi)
    return np.stack([ring * np.cos(theta), ring * np.sin(theta), small * np.sin(phi)], 1)


SHAPES = {
    "sphere": _sphere,
    "cube": lambda n, rng: sample_mesh(*_CUBE, n, rng),
    "cylinder": lambda n, rng: _tube(n, rng, 0.55, 0.8, "flat"),
    "cone": _cone,
    "torus": _torus,
    "pyramid": lambda n, rng: sample_mesh(*_PYRAMID, n, rng),
    "capsule": lambda n, rng: _tube(n, rng, 0.4, 0.5, "round"),
    "plane patch": lambda n, rng: sample_mesh(*_PLANE, n, rng),
}


def random_rotation(rng: np.random.Generator, kind: str = "so3") -> np.ndarray:
    """A random rotation matrix: ``"so3"`` uniform over all rotations (QR of a Gaussian matrix, signs
    fixed, det +1); ``"z"`` about the vertical axis only, by a uniform angle (ModelNet's usual augmentation)."""
    check_choice("rotation", kind, ROTATIONS)
    if kind == "z":
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_point_clouds(n: int, num_points: int = 256, seed: int = 0, shapes: tuple[str, ...] | None = None,
                      scale: tuple[float, float] = (0.7, 1.2), jitter: float = 0.02, rotation: str = "so3") -> PointClouds:
    """``n`` clouds of ``num_points`` points each, from the primitives ``shapes`` (default: all of :data:`SHAPES`).

    Classes take turns, so each appears ``n / C`` times (±1); each cloud is a surface sample of its
    primitive, rotated at random (``rotation``: see :func:`random_rotation`), scaled by a factor drawn from ``scale`` and jittered with
    Gaussian noise of standard deviation ``jitter``. The same ``seed`` gives the same clouds.
    """
    check_count("n", n, 1000)
    check_count("num_points", num_points, 256)
    check_choice("rotation", rotation, ROTATIONS)
    names = tuple(SHAPES) if shapes is None else tuple(shapes)
    for name in names:
        check_choice("shape", name, tuple(SHAPES))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(names))
    clouds = np.empty((n, num_points, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        p = SHAPES[names[label]](num_points, rng) @ random_rotation(rng, rotation).T * rng.uniform(*scale)
        clouds[i] = p + rng.normal(scale=jitter, size=p.shape)
    return PointClouds(torch.from_numpy(clouds), torch.from_numpy(labels.astype(np.int64)), names)


def point_cloud_split(n_train: int = 1600, n_test: int = 400, num_points: int = 256, seed: int = 0,
                      **kwargs) -> tuple[PointClouds, PointClouds]:
    """A training and a test set of generated clouds, drawn with different seeds from ``seed``."""
    return (make_point_clouds(n_train, num_points, seed=2 * seed, **kwargs),
            make_point_clouds(n_test, num_points, seed=2 * seed + 1, **kwargs))


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` and triangles ``(F, 3)`` of an OFF mesh file; polygons are fanned into triangles.

    Accepts ModelNet's variant whose first line runs the ``OFF`` header into the counts (``OFF490 518 0``).
    Raises ``ValueError`` for a file that is not OFF.
    """
    lines = [ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        raise ValueError(f"{path} is not an OFF mesh: its first line should start with 'OFF'.")
    header = lines[0][3:].split() or lines.pop(1).split()
    num_vertices, num_faces = int(header[0]), int(header[1])
    body = lines[1 : 1 + num_vertices + num_faces]
    if len(body) < num_vertices + num_faces:
        raise ValueError(f"{path} is cut short: its header promises {num_vertices} vertices and {num_faces} faces.")
    vertices = np.array([[float(v) for v in ln.split()[:3]] for ln in body[:num_vertices]])
    triangles = []
    for ln in body[num_vertices:]:
        count, *ids = (int(v) for v in ln.split())
        triangles += [[ids[0], ids[j], ids[j + 1]] for j in range(1, count - 1)]
    return vertices, np.array(triangles, dtype=np.int64)


def load_modelnet40(root: str | Path, split: str = "train", num_points: int = 1024, seed: int = 0,
                    download: bool = False, cache: bool = True) -> PointClouds:
    """ModelNet40 from its standard layout ``root/ModelNet40/<class>/<split>/*.off``, as :class:`PointClouds`.

    Each mesh gives ``num_points`` points uniform by area (seeded), centred and scaled into the unit
    sphere. Classes are the sorted folder names. Parsing some 12,000 meshes takes minutes, so with
    ``cache`` the sampled points are saved once with safetensors under ``root/ModelNet40_cache/``
    and read back while the list of mesh files is unchanged. ``download=True`` refuses, since effnb
    records no sha256 for the archive and downloads nothing it cannot verify. Raises
    ``FileNotFoundError`` with the fix when the folder is missing.
    """
    check_choice("split", split, ("train", "test"))
    check_count("num_points", num_points, 1024)
    folder = Path(root) / "ModelNet40"
    if download:
        raise NotImplementedError(f"download=True cannot fetch ModelNet40, because effnb records no sha256 for its "
                                  f"archive; download {MODELNET40_URL} yourself and unzip it into {root}.")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; unzip ModelNet40.zip ({MODELNET40_URL}) into {root} so that it "
                                "holds ModelNet40/<class>/train and test folders of .off files.")
    names = tuple(sorted(p.name for p in folder.iterdir() if (p / split).is_dir()))
    files = [(label, path) for label, name in enumerate(names) for path in sorted((folder / name / split).glob("*.off"))]
    if not files:
        raise FileNotFoundError(f"{folder} holds no <class>/{split}/*.off files; is it the unzipped ModelNet40?")
    listing = json.dumps({"names": names, "files": [str(path.relative_to(folder)) for _, path in files]})
    cached = Path(root) / "ModelNet40_cache" / f"{split}_{num_points}_seed{seed}.safetensors"
    if cache and cached.exists():
        with open(cached, "rb") as handle:                      # the header holds the listing it was made from
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        if header.get("__metadata__", {}).get("listing") == listing:
            tensors = load_file(str(cached))
            return PointClouds(tensors["points"], tensors["labels"], names)
    rng = np.random.default_rng(seed)
    clouds = np.empty((len(files), num_points, 3), dtype=np.float32)
    for i, (_, path) in enumerate(files):
        p = sample_mesh(*read_off(path), num_points, rng)
        p = p - p.mean(0)
        clouds[i] = p / np.linalg.norm(p, axis=1).max()
    result = PointClouds(torch.from_numpy(clouds), torch.tensor([label for label, _ in files]), names)
    if cache:
        with atomic_path(cached) as tmp:
            save_file({"points": result.points, "labels": result.labels}, str(tmp), metadata={"listing": listing})
    return result


def normalize_clouds(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud of ``(B, N, 3)`` at the origin and scale it into the unit sphere (max radius 1)."""
    centred = points - points.mean(1, keepdim=True)
    return centred / centred.norm(dim=2).amax(1)[:, None, None].clamp(min=1e-12)


def farthest_point_sample(points: torch.Tensor, num_centres: int) -> torch.Tensor:
    """Indices ``(B, num_centres)`` of farthest-point sampling in each cloud of ``(B, N, 3)``.

    Starts at point 0; each next centre is the point farthest from all centres so far. One loop
    step per centre, vectorised over the batch and the points.
    """
    b, n, _ = points.shape
    if isinstance(num_centres, bool) or not isinstance(num_centres, int) or not 1 <= num_centres <= n:
        raise ValueError(f"num_centres={num_centres!r} must be an int between 1 and the {n} points of a cloud.")
    rows = torch.arange(b, device=points.device)
    chosen = torch.zeros(b, num_centres, dtype=torch.long, device=points.device)
    nearest = torch.full((b, n), float("inf"), device=points.device)
    farthest = torch.zeros(b, dtype=torch.long, device=points.device)
    for i in range(num_centres):
        chosen[:, i] = farthest
        nearest = torch.minimum(nearest, ((points - points[rows, farthest][:, None]) ** 2).sum(-1))
        farthest = nearest.argmax(1)
    return chosen


def group_points(points: torch.Tensor, num_centres: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-transformer patches: farthest-point centres and each centre's ``k`` nearest points.

    Returns ``(neighbours (B, G, k, 3), centres (B, G, 3))`` with the neighbours relative to their
    centre (a centre is its own nearest neighbour). Raises ``ValueError`` for ``k`` above N.
    """
    n = points.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an int between 1 and the {n} points of a cloud.")
    rows = torch.arange(len(points), device=points.device)[:, None]
    centres = points[rows, farthest_point_sample(points, num_centres)]
    distances = torch.cdist(centres, points, compute_mode="donot_use_mm_for_euclid_dist")   # exact, not via matmul
    nearest = distances.topk(k, largest=False).indices                              # (B, G, k)
    return points[rows[:, :, None], nearest] - centres[:, :, None], centres
