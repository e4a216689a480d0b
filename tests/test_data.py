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
