"""effnb.pointclouds: the primitive generator, mesh sampling, OFF reading and the ModelNet40 loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effnb import pointclouds as P


def test_there_are_at_least_eight_primitives_and_each_lies_on_its_surface():
    assert len(P.SHAPES) >= 8
    rng = np.random.default_rng(0)
    sphere = P.SHAPES["sphere"](500, rng)
    assert np.allclose(np.linalg.norm(sphere, axis=1), 0.9)
    cube = P.SHAPES["cube"](500, rng)
    assert np.allclose(np.abs(cube).max(1), 0.7), "every cube point lies on a face"
    plane = P.SHAPES["plane patch"](500, rng)
    assert np.allclose(plane[:, 2], 0) and np.abs(plane[:, :2]).max() <= 1
    torus = P.SHAPES["torus"](500, rng)
    assert np.allclose(np.hypot(np.hypot(torus[:, 0], torus[:, 1]) - 0.65, torus[:, 2]), 0.25)
    cylinder = P.SHAPES["cylinder"](2000, rng)
    radial = np.hypot(cylinder[:, 0], cylinder[:, 1])
    on_side = np.isclose(radial, 0.55)
    assert np.all(on_side | np.isclose(np.abs(cylinder[:, 2]), 0.8)), "on the side or a cap"
    side_share = 2 * np.pi * 0.55 * 1.6 / (2 * np.pi * 0.55 * 1.6 + 2 * np.pi * 0.55 ** 2)
    assert abs(on_side.mean() - side_share) < 0.04, "uniform by area"
    capsule = P.SHAPES["capsule"](1000, rng)
    z_over = np.clip(np.abs(capsule[:, 2]) - 0.5, 0, None)
    assert np.allclose(np.hypot(np.hypot(capsule[:, 0], capsule[:, 1]), z_over), 0.4), "side or hemispherical caps"
    for name, sampler in P.SHAPES.items():
        assert sampler(64, rng).shape == (64, 3), name


def test_sample_mesh_is_uniform_by_area():
    # two triangles, the second four times the area of the first
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [10, 0, 0], [12, 0, 0], [10, 2, 0]], dtype=float)
    points = P.sample_mesh(vertices, np.array([[0, 1, 2], [3, 4, 5]]), 20000, np.random.default_rng(0))
    assert abs((points[:, 0] >= 10).mean() - 0.8) < 0.02
    small = points[points[:, 0] < 10]
    assert (small.sum(1) <= 1 + 1e-9).all() and (small >= -1e-12).all(), "inside the triangle"
    with pytest.raises(ValueError, match="zero surface area"):
        P.sample_mesh(np.zeros((3, 3)), np.array([[0, 1, 2]]), 5, np.random.default_rng(0))


def test_random_rotation_is_a_rotation():
    r = P.random_rotation(np.random.default_rng(3))
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)


def test_make_point_clouds_is_balanced_deterministic_and_checked():
    a = P.make_point_clouds(40, 32, seed=1)
    b = P.make_point_clouds(40, 32, seed=1)
    assert a.points.shape == (40, 32, 3) and a.points.dtype == torch.float32
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.points, P.make_point_clouds(40, 32, seed=2).points)
    assert torch.bincount(a.labels, minlength=8).tolist() == [5] * 8 and a.num_classes == 8 and len(a) == 40
    assert float(a.points.abs().max()) < 1.5
    two = P.make_point_clouds(10, 16, shapes=("sphere", "cube"))
    assert two.names == ("sphere", "cube") and set(two.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="shape='prism' is not valid"):
        P.make_point_clouds(4, 16, shapes=("prism",))
    with pytest.raises(ValueError, match="num_points=0 must be a whole number"):
        P.make_point_clouds(4, 0)
    train, test = P.point_cloud_split(16, 8, 16, seed=0)
    assert len(train) == 16 and len(test) == 8 and not torch.equal(train.points[:8], test.points)
    assert train.to("cpu").points.device.type == "cpu"


def write_off(path, vertices, faces, merged_header=False):
    head = f"OFF{len(vertices)} {len(faces)} 0\n" if merged_header else f"OFF\n{len(vertices)} {len(faces)} 0\n"
    body = "".join(" ".join(map(str, v)) + "\n" for v in vertices)
    body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + body)


def test_read_off_fans_polygons_and_accepts_modelnets_merged_header(tmp_path):
    square = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    write_off(tmp_path / "a.off", square, [[0, 1, 2, 3]])
    write_off(tmp_path / "b.off", square, [[0, 1, 2], [0, 2, 3]], merged_header=True)
    va, fa = P.read_off(tmp_path / "a.off")
    vb, fb = P.read_off(tmp_path / "b.off")
    assert np.array_equal(va, vb) and fa.tolist() == fb.tolist() == [[0, 1, 2], [0, 2, 3]]
    (tmp_path / "c.off").write_text("PLY\n")
    with pytest.raises(ValueError, match="not an OFF mesh"):
        P.read_off(tmp_path / "c.off")
    (tmp_path / "d.off").write_text("OFF\n4 1 0\n0 0 0\n")
    with pytest.raises(ValueError, match="cut short"):
        P.read_off(tmp_path / "d.off")


def test_load_modelnet40_reads_a_fabricated_sample(tmp_path):
    cube_v, cube_f = P._CUBE
    for name in ("chair", "airplane"):
        for split in ("train", "test"):
            for i in range(2):
                write_off(tmp_path / "ModelNet40" / name / split / f"{name}_{i:04d}.off", (cube_v * 7 + 3).tolist(),
                          cube_f.tolist(), merged_header=i == 1)
    clouds = P.load_modelnet40(tmp_path, "test", num_points=64)
    assert clouds.names == ("airplane", "chair") and clouds.labels.tolist() == [0, 0, 1, 1]
    assert clouds.points.shape == (4, 64, 3)
    radius = clouds.points.norm(dim=2)
    assert torch.allclose(radius.max(1).values, torch.ones(4)) and float(clouds.points.mean(1).abs().max()) < 1e-5
    with pytest.raises(FileNotFoundError, match="unzip ModelNet40.zip"):
        P.load_modelnet40(tmp_path / "nowhere")
    with pytest.raises(NotImplementedError, match="records no sha256"):
        P.load_modelnet40(tmp_path, download=True)
    with pytest.raises(ValueError, match="split='val' is not valid"):
        P.load_modelnet40(tmp_path, "val")


def test_rotation_kinds():
    z = P.random_rotation(np.random.default_rng(0), "z")
    assert np.allclose(z[2], [0, 0, 1]) and np.allclose(z @ z.T, np.eye(3))
    upright = P.make_point_clouds(8, 64, rotation="z", shapes=("plane patch",), jitter=0.0)
    assert float(upright.points[..., 2].abs().max()) < 1e-6, "a z-rotation keeps the patch horizontal"
    with pytest.raises(ValueError, match="rotation='x' is not valid"):
        P.make_point_clouds(4, 16, rotation="x")


def test_normalize_farthest_point_sample_and_group():
    clouds = P.normalize_clouds(P.make_point_clouds(3, 50, seed=4).points * 5 + 2)
    assert torch.allclose(clouds.norm(dim=2).amax(1), torch.ones(3)) and float(clouds.mean(1).abs().max()) < 1e-5
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0], [9, 0, 0]]])
    assert P.farthest_point_sample(line, 3).tolist() == [[0, 3, 2]]
    neighbours, centres = P.group_points(clouds, 4, 6)
    assert neighbours.shape == (3, 4, 6, 3) and centres.shape == (3, 4, 3)
    assert torch.allclose(neighbours[:, :, 0], torch.zeros(3, 4, 3)), "each centre is its own nearest point"
    brute = (centres[0][:, None] - clouds[0][None]).norm(dim=-1).sort(1).values[:, :6]
    assert torch.allclose(neighbours[0].norm(dim=2), brute, atol=1e-6)
    with pytest.raises(ValueError, match="num_centres=51 must be an int between 1 and the 50 points"):
        P.farthest_point_sample(clouds, 51)
    with pytest.raises(ValueError, match="k=0 must be an int"):
        P.group_points(clouds, 4, 0)


def test_load_modelnet40_caches_its_samples_and_notices_new_files(tmp_path, monkeypatch):
    cube_v, cube_f = P._CUBE
    for i in range(2):
        write_off(tmp_path / "ModelNet40" / "cube" / "train" / f"cube_{i}.off", cube_v.tolist(), cube_f.tolist())
    first = P.load_modelnet40(tmp_path, num_points=16)
    assert (tmp_path / "ModelNet40_cache" / "train_16_seed0.safetensors").exists()
    monkeypatch.setattr(P, "read_off", lambda path: (_ for _ in ()).throw(AssertionError("parsed again")))
    again = P.load_modelnet40(tmp_path, num_points=16)
    assert torch.equal(first.points, again.points) and again.names == ("cube",)
    monkeypatch.undo()
    write_off(tmp_path / "ModelNet40" / "cube" / "train" / "cube_2.off", cube_v.tolist(), cube_f.tolist())
    assert len(P.load_modelnet40(tmp_path, num_points=16)) == 3, "a new mesh file invalidates the cache"
    uncached = P.load_modelnet40(tmp_path, num_points=16, cache=False)
    assert torch.equal(uncached.points, P.load_modelnet40(tmp_path, num_points=16).points)
