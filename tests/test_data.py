import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
import torch

from effnb import data


def test_digits_split_shapes_and_range():
    split = data.load_digits()
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    # Stratified: every class in both parts, in about the same share.
    assert (data.class_counts(split.y_test, 10) >= 40).all()


def test_digits_resize_and_determinism():
    a, b = data.load_digits(size=16, seed=1), data.load_digits(size=16, seed=1)
    assert a.image_shape == (1, 16, 16)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_train, data.load_digits(size=16, seed=2).y_train)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_resize_is_refused(size):
    with pytest.raises(ValueError, match="must be a positive int"):
        data.load_digits(size=size)


def test_bad_test_fraction_is_refused():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data.load_digits(test_fraction=1.0)


def test_long_tail_counts_match_cifar10_lt():
    assert data.long_tail_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    assert data.long_tail_counts(5000, 10, 100)[-1] == 50
    assert data.long_tail_counts(7, 3, 1) == [7, 7, 7]


def test_long_tail_counts_errors():
    with pytest.raises(ValueError, match="imbalance=0.5 must be >= 1"):
        data.long_tail_counts(100, 10, 0.5)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        data.long_tail_counts(100, 1, 10)


def test_long_tail_subset_keeps_quotas_and_is_seeded():
    split = data.load_digits()
    x, y = data.long_tail_subset(split.x_train, split.y_train, 10, imbalance=10, seed=0)
    counts = data.class_counts(y, 10).tolist()
    n_max = int(data.class_counts(split.y_train, 10).min())
    assert counts == data.long_tail_counts(n_max, 10, 10)
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    x2, _ = data.long_tail_subset(split.x_train, split.y_train, 10, imbalance=10, seed=0)
    assert torch.equal(x, x2)


# ------------------------------------------------------------------ fabricated files in the real formats
def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    files = []
    for name, arr in arrays.items():
        (root / name).write_bytes(gzip.compress(_idx_bytes(arr)))
        files.append(data.RemoteFile("https://example.invalid/" + name, name, data.sha256_of(root / name)))
    return arrays, files


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    assert np.array_equal(data.read_idx(tmp_path / "a.idx"), arr)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic number"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((2, 2)))[:-1])
    with pytest.raises(ValueError, match="header promises 4"):
        data.read_idx(tmp_path / "short")


def test_load_mnist_from_local_files(tmp_path, monkeypatch):
    arrays, files = _fake_mnist(tmp_path)
    monkeypatch.setitem(data.REGISTRY, "mnist", files)
    split = data.load_mnist(tmp_path)
    assert split.x_train.shape == (6, 1, 28, 28) and split.x_test.shape == (4, 1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"][1].astype(np.float32) / 255)
    assert torch.allclose(split.x_train[1, 0], expected)
    assert split.y_test.tolist() == [0, 1, 2, 3]
    assert data.load_mnist(tmp_path, size=14).image_shape == (1, 14, 14)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pass download=True \(needs internet\) or copy"):
        data.load_mnist(tmp_path)


def test_corrupt_file_is_refused(tmp_path, monkeypatch):
    _, files = _fake_mnist(tmp_path)
    monkeypatch.setitem(data.REGISTRY, "mnist", files)
    (tmp_path / files[0].filename).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="delete it and fetch again"):
        data.load_mnist(tmp_path)


def test_unknown_data_set_names_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"name='imagenet' is not valid; use one of 'cifar10', 'mnist'\."):
        data.fetch("imagenet", tmp_path)


def test_download_writes_and_verifies(tmp_path, monkeypatch):
    payload = b"pretend archive"
    remote = data.RemoteFile("https://example.invalid/x.bin", "x.bin", __import__("hashlib").sha256(payload).hexdigest())
    monkeypatch.setitem(data.REGISTRY, "toy", [remote])
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    (path,) = data.fetch("toy", tmp_path / "sub", download=True)
    assert path.read_bytes() == payload and not list(tmp_path.glob("sub/*.part"))


def test_download_without_network_fails_fast(tmp_path):
    # Only the guard's own error counts (an offline machine without the guard raises another OSError
    # or hangs), and it comes at once, before any byte is written.
    import time

    from effnb.config import NetworkBlockedError

    start = time.perf_counter()
    with pytest.raises(NetworkBlockedError, match="'www.cs.toronto.edu' is blocked"):
        data.fetch("cifar10", tmp_path, download=True)
    assert time.perf_counter() - start < 1.0 and list(tmp_path.iterdir()) == []


def _fake_cifar_tar(path, n_per_batch=3):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    records = {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            labels = rng.integers(0, 10, n_per_batch, dtype=np.uint8)
            pixels = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            blob = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
            records[name] = (labels, pixels)
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    path.write_bytes(buf.getvalue())
    return records


def test_load_cifar10_from_binary_archive(tmp_path, monkeypatch):
    records = _fake_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    remote = data.RemoteFile("https://example.invalid/c.tgz", "cifar-10-binary.tar.gz",
                             data.sha256_of(tmp_path / "cifar-10-binary.tar.gz"))
    monkeypatch.setitem(data.REGISTRY, "cifar10", [remote])
    split = data.load_cifar10(tmp_path)
    assert split.x_train.shape == (15, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    labels, pixels = records["data_batch_1.bin"]
    assert split.y_train[:3].tolist() == labels.tolist()
    # Channel-major layout: the first 1024 bytes are the red plane.
    assert torch.allclose(split.x_train[0, 0].flatten(), torch.from_numpy(pixels[0, :1024] / 255.0).float())


def test_cifar_record_size_is_checked():
    with pytest.raises(ValueError, match="multiple of 3073 bytes"):
        data.read_cifar10_binary(b"\x00" * 100)


# ------------------------------------------------------------------ fault injection: downloads
class _BrokenStream(io.BytesIO):
    """A response that delivers some bytes, then loses the connection."""

    def read(self, size=-1):
        if self.tell() >= 4:
            raise ConnectionResetError("connection lost mid-download")
        return super().read(4)


def test_a_download_with_the_wrong_sha256_leaves_no_file(tmp_path, monkeypatch):
    remote = data.RemoteFile("https://example.invalid/x.bin", "x.bin", "0" * 64)
    monkeypatch.setitem(data.REGISTRY, "toy", [remote])
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"wrong bytes"))
    with pytest.raises(ValueError, match=r"x\.bin is corrupt \(sha256 .* instead of 000000000000…\); nothing was kept"):
        data.fetch("toy", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == [], "neither the bad file nor a temporary file may stay"


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    payload = b"pretend archive"
    remote = data.RemoteFile("https://example.invalid/x.bin", "x.bin", __import__("hashlib").sha256(payload).hexdigest())
    monkeypatch.setitem(data.REGISTRY, "toy", [remote])
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: _BrokenStream(payload))
    with pytest.raises(ConnectionResetError):
        data.fetch("toy", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    (path,) = data.fetch("toy", tmp_path, download=True)  # the next try starts clean and succeeds
    assert path.read_bytes() == payload and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    mode = target.stat().st_mode & 0o777
    with pytest.raises(RuntimeError, match="disk full"):
        with data.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    with pytest.raises(ValueError, match="is corrupt"):
        with data.atomic_path(target, sha256="1" * 64) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    with data.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == mode, "permissions are kept"


# ------------------------------------------------------------------ Chapter 7: generated dense scenes
@pytest.fixture(scope="module")
def scenes():
    return data.make_dense_scenes(500, size=32, seed=0)


def test_dense_scenes_shapes_dtypes_and_ranges(scenes):
    assert len(scenes) == 500 and scenes.num_classes == 4
    assert scenes.images.shape == (500, 3, 32, 32) and scenes.images.dtype == torch.float32
    assert scenes.segmentation.shape == (500, 32, 32) and scenes.segmentation.dtype == torch.int64
    assert scenes.depth.shape == (500, 1, 32, 32) and scenes.depth.dtype == torch.float32
    assert scenes.normals.shape == (500, 3, 32, 32) and scenes.normals.dtype == torch.float32
    assert scenes.boundaries.shape == (500, 1, 32, 32) and scenes.boundaries.dtype == torch.float32
    assert 0 <= scenes.images.min() and scenes.images.max() <= 1
    assert 0 <= scenes.segmentation.min() and scenes.segmentation.max() < 4
    assert torch.isfinite(scenes.depth).all() and scenes.depth.min() > 0
    assert set(scenes.boundaries.unique().tolist()) == {0.0, 1.0}


def test_dense_scenes_are_deterministic_per_seed():
    a, b = data.make_dense_scenes(20, size=16, seed=3), data.make_dense_scenes(20, size=16, seed=3)
    for name in ("images", "segmentation", "depth", "normals", "boundaries"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = data.make_dense_scenes(20, size=16, seed=4)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.segmentation, c.segmentation)


def test_every_class_appears_and_objects_take_a_fair_share(scenes):
    pixels = torch.bincount(scenes.segmentation.flatten(), minlength=4) / scenes.segmentation.numel()
    assert (pixels > 0.03).all(), pixels
    scenes_with = [(scenes.segmentation == c).flatten(1).any(1).sum().item() for c in range(4)]
    assert scenes_with[0] == 500 and min(scenes_with[1:]) > 100, scenes_with
    more = data.make_dense_scenes(200, size=16, seed=1, num_classes=7, max_objects=6)
    assert more.segmentation.unique().tolist() == list(range(7))


def test_scene_normals_are_unit_and_follow_from_the_depth(scenes):
    assert torch.allclose(scenes.normals.norm(dim=1), torch.ones(500, 32, 32), atol=1e-5)
    assert torch.allclose(scenes.normals, data.normals_from_depth(scenes.depth, pixel_size=2 / 32), atol=1e-5)
    assert (scenes.normals[:, 2] > 0).all()


def test_scene_boundaries_follow_from_the_segmentation(scenes):
    assert torch.equal(scenes.boundaries, data.boundaries_from_segmentation(scenes.segmentation))


def test_objects_lie_in_front_of_the_background_plane(scenes):
    # The background's depth is a plane: fit it to the background pixels of each scene and
    # extrapolate it under the objects; every object pixel must be nearer than that plane.
    coords = (torch.arange(32, dtype=torch.float64) + 0.5) / 16 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    design = torch.stack([x.flatten(), y.flatten(), torch.ones(32 * 32, dtype=torch.float64)], 1)
    checked = 0
    for i in range(0, 500, 5):
        depth, background = scenes.depth[i, 0].flatten().double(), scenes.segmentation[i].flatten() == 0
        if background.sum() < 20 or background.all():
            continue
        plane = torch.linalg.lstsq(design[background], depth[background, None]).solution
        behind = (design @ plane)[:, 0]
        assert torch.allclose(behind[background], depth[background], atol=1e-4), "the background is not a plane"
        assert (depth[~background] < behind[~background] - 0.3).all()
        checked += 1
    assert checked > 80


def test_colour_is_a_strong_but_imperfect_cue_to_the_class(scenes):
    # Nearest class-mean hue (rgb / brightness) on object pixels: far above chance (1/3), far from perfect.
    mask = scenes.segmentation > 0
    rgb = scenes.images.permute(0, 2, 3, 1)[mask]
    chroma = rgb / rgb.sum(1, keepdim=True)
    labels = scenes.segmentation[mask]
    means = torch.stack([chroma[labels == c].mean(0) for c in (1, 2, 3)])
    predicted = torch.cdist(chroma, means).argmin(1) + 1
    accuracy = (predicted == labels).float().mean().item()
    assert 0.5 < accuracy < 0.9, accuracy  # about 0.67 at seed 0


def test_normals_of_a_plane_equal_the_analytic_normal():
    a, b, c = 0.3, -1.2, 5.0
    coords = torch.arange(6, dtype=torch.float32) * 0.5  # pixel_size 0.5
    y, x = torch.meshgrid(coords, torch.arange(8, dtype=torch.float32) * 0.5, indexing="ij")
    depth = (a * x + b * y + c)[None, None]  # (1, 1, 6, 8)
    normals = data.normals_from_depth(depth, pixel_size=0.5)
    expected = torch.tensor([-a, -b, 1.0]) / (a * a + b * b + 1) ** 0.5
    assert normals.shape == (1, 3, 6, 8)
    assert torch.allclose(normals, expected[None, :, None, None].expand(1, 3, 6, 8), atol=1e-6)
    flat = data.normals_from_depth(torch.full((2, 1, 3, 3), 4.0))
    assert torch.equal(flat, torch.tensor([0.0, 0.0, 1.0])[None, :, None, None].expand(2, 3, 3, 3))


def test_boundaries_mark_both_sides_of_each_label_change():
    segmentation = torch.tensor([[[0, 0, 1, 1],
                                  [0, 0, 1, 1],
                                  [2, 2, 2, 2],
                                  [2, 2, 2, 2]]])
    expected = torch.tensor([[[0, 1, 1, 0],
                              [1, 1, 1, 1],
                              [1, 1, 1, 1],
                              [0, 0, 0, 0]]], dtype=torch.float32)
    assert torch.equal(data.boundaries_from_segmentation(segmentation), expected[:, None])
    assert data.boundaries_from_segmentation(torch.zeros(1, 3, 3, dtype=torch.int64)).sum() == 0


def test_subset_and_split(scenes):
    part = scenes.subset(slice(10, 15))
    assert len(part) == 5 and torch.equal(part.depth, scenes.depth[10:15]) and part.num_classes == 4
    one = scenes.subset(7)
    assert len(one) == 1 and torch.equal(one.segmentation[0], scenes.segmentation[7])
    picked = scenes.subset(torch.tensor([3, 1]))
    assert torch.equal(picked.normals, scenes.normals[[3, 1]])
    moved = part.to("meta")
    assert all(getattr(moved, n).device.type == "meta" for n in ("images", "segmentation", "depth", "normals",
                                                                   "boundaries")) and moved.num_classes == 4
    train, test = data.dense_scene_split(n_train=12, n_test=5, size=16, seed=2)
    assert (len(train), len(test)) == (12, 5)
    assert torch.equal(train.images, data.make_dense_scenes(12, size=16, seed=4).images)
    assert torch.equal(test.images, data.make_dense_scenes(5, size=16, seed=5).images)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n": 0}, ValueError, r"n=0 must be a whole number >= 1, e\.g\. n=2000\."),
    ({"n": 2.5}, TypeError, r"n=2\.5 must be a whole number >= 1"),
    ({"n": 4, "size": 4}, ValueError, r"size=4 is too small; use at least 8 pixels per side"),
    ({"n": 4, "num_classes": 1}, ValueError, r"num_classes=1 leaves no object class; use at least 2"),
    ({"n": 4, "max_objects": 0}, ValueError, r"max_objects=0 must be a whole number >= 1"),
    ({"n": 4, "seed": -1}, TypeError, r"seed=-1 must be a non-negative integer"),
])
def test_bad_scene_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.make_dense_scenes(**kwargs)


def test_dense_scenes_check_their_shapes_and_helpers_their_inputs():
    scenes = data.make_dense_scenes(2, size=8)
    with pytest.raises(ValueError, match=r"depth has shape \(2, 8, 8\); images of shape \(2, 3, 8, 8\) need"):
        data.DenseScenes(scenes.images, scenes.segmentation, scenes.depth[:, 0], scenes.normals,
                         scenes.boundaries, num_classes=4)
    with pytest.raises(ValueError, match=r"depth must have shape \(N, 1, H, W\)"):
        data.normals_from_depth(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"segmentation must have shape \(N, H, W\)"):
        data.boundaries_from_segmentation(torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------ Chapter 7: NYUD-v2, fabricated offline
def _fake_nyud(root, height=12, width=16):
    """A tiny NYUD_MT folder in MTI-Net's layout (train 0001, 0002; val 0003); returns the arrays written, by id."""
    from PIL import Image

    ids_by_split = {"train": ["0001", "0002"], "val": ["0003"]}
    folder = root / "NYUD_MT"
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for number, image_id in enumerate(sum(ids_by_split.values(), [])):
        ramp = np.linspace(40, 220, width)[None, :, None] * np.ones((height, 1, 3))
        image = ramp.astype(np.uint8)  # smooth, so JPEG keeps it close
        labels = rng.integers(0, 41, (height, width)).astype(np.uint8)  # 0 = unlabelled
        depth = rng.uniform(0.5, 10, (height, width)).astype(np.float32)
        normals = rng.normal(size=(height, width, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=2, keepdims=True)
        edge = (rng.random((height, width)) < 0.2).astype(np.float32)
        Image.fromarray(image).save(folder / "images" / f"{image_id}.jpg", quality=100)
        Image.fromarray(labels).save(folder / "segmentation" / f"{image_id}.png")
        np.save(folder / "depth" / f"{image_id}.npy", depth)
        if number % 2 == 0:  # MTI-Net's .npy files
            np.save(folder / "normals" / f"{image_id}.npy", normals)
            np.save(folder / "edge" / f"{image_id}.npy", edge)
        else:  # the PNG encodings
            rgb = np.round((normals + 1) / 2 * 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / "normals" / f"{image_id}.png")
            normals = 2 * rgb.astype(np.float32) / 255 - 1
            normals /= np.linalg.norm(normals, axis=2, keepdims=True)
            Image.fromarray((edge * 255).astype(np.uint8)).save(folder / "edge" / f"{image_id}.png")
        written[image_id] = {"image": image, "labels": labels, "depth": depth, "normals": normals, "edge": edge}
    for split, ids in ids_by_split.items():
        (folder / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return written


def test_load_nyud_reads_every_task(tmp_path):
    written = _fake_nyud(tmp_path)
    train = data.load_nyud(tmp_path)
    assert len(train) == 2 and train.num_classes == 40 and train.ignore_index == 255
    assert train.images.shape == (2, 3, 12, 16) and train.segmentation.dtype == torch.int64
    for row, image_id in enumerate(["0001", "0002"]):
        w = written[image_id]
        labels = torch.from_numpy(w["labels"].astype(np.int64))
        assert torch.equal(train.segmentation[row], torch.where(labels == 0, 255, labels - 1))
        assert torch.equal(train.depth[row, 0], torch.from_numpy(w["depth"]))
        assert torch.allclose(train.normals[row], torch.from_numpy(w["normals"]).permute(2, 0, 1), atol=1e-6)
        assert torch.equal(train.boundaries[row, 0], torch.from_numpy(w["edge"]))
        image = torch.from_numpy(w["image"].astype(np.float32) / 255).permute(2, 0, 1)
        assert (train.images[row] - image).abs().mean() < 0.02  # JPEG is lossy
    assert 255 in train.segmentation.unique() and train.segmentation[train.segmentation != 255].max() <= 39
    assert len(data.load_nyud(tmp_path / "NYUD_MT", split="val")) == 1  # root may be the folder itself


def test_load_nyud_resizes_labels_nearest_and_renormalises_normals(tmp_path):
    _fake_nyud(tmp_path)
    small = data.load_nyud(tmp_path, size=(6, 8))
    assert small.images.shape == (2, 3, 6, 8) and small.segmentation.shape == (2, 6, 8)
    original = set(data.load_nyud(tmp_path).segmentation.unique().tolist())
    assert set(small.segmentation.unique().tolist()) <= original  # nearest: no blended labels
    assert set(small.boundaries.unique().tolist()) <= {0.0, 1.0}
    length = small.normals.norm(dim=1)
    assert torch.allclose(length[length > 0], torch.ones(()), atol=1e-5)
    assert data.load_nyud(tmp_path, split="val", size=5).images.shape == (1, 3, 5, 5)


def test_load_nyud_says_where_the_data_goes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gt_sets/train\.txt is missing; extract NYUD_MT\.tgz"):
        data.load_nyud(tmp_path)
    with pytest.raises(NotImplementedError, match="records no sha256 for its archive"):
        data.load_nyud(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == [], "nothing is written when nothing can be verified"


def test_load_nyud_names_a_listed_id_without_files(tmp_path):
    _fake_nyud(tmp_path)
    (tmp_path / "NYUD_MT" / "gt_sets" / "val.txt").write_text("0003\n0009\n")
    with pytest.raises(FileNotFoundError, match=r"0009\.jpg is missing, but .*val\.txt lists the id '0009'"):
        data.load_nyud(tmp_path, split="val")


def test_load_nyud_refuses_bad_arguments(tmp_path):
    _fake_nyud(tmp_path)
    with pytest.raises(ValueError, match=r"split='test' is not valid; use one of 'train', 'val'\."):
        data.load_nyud(tmp_path, split="test")
    with pytest.raises(ValueError, match=r"size=0 must be a positive int"):
        data.load_nyud(tmp_path, size=0)


def test_load_nyud_downloads_verifies_and_unpacks_once_a_sha256_is_recorded(tmp_path, monkeypatch):
    source = tmp_path / "source"
    _fake_nyud(source)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "NYUD_MT", arcname="NYUD_MT")
    payload = buffer.getvalue()
    remote = data.RemoteFile(data.NYUD_ARCHIVE_URL, "NYUD_MT.tgz", __import__("hashlib").sha256(payload).hexdigest())
    monkeypatch.setitem(data.REGISTRY, "nyud", [remote])
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    target = tmp_path / "target"
    with pytest.raises(FileNotFoundError, match=r"or pass download=True \(needs internet\)"):
        data.load_nyud(target)
    scenes = data.load_nyud(target, split="val", download=True)
    assert len(scenes) == 1 and (target / "NYUD_MT" / "gt_sets" / "train.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["NYUD_MT", "NYUD_MT.tgz"], "no temporary folder stays"


def test_split_to_keeps_the_tensors_and_the_class_count():
    split = data.load_digits(size=8)
    moved = split.to("cpu")
    assert moved.num_classes == split.num_classes and moved.x_train.device.type == "cpu"
    assert torch.equal(moved.x_test, split.x_test) and torch.equal(moved.y_train, split.y_train)

