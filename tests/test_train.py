import json
from pathlib import Path

import pytest
import torch
from torch import nn

from effnb import train
from effnb.data import load_digits, sha256_of
from effnb.models import SmallCNN


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_fit_learns_digits_and_is_deterministic(digits):
    torch.manual_seed(0)
    a = SmallCNN(width=8)
    history = train.fit(a, digits.x_train, digits.y_train, epochs=3, lr=1e-2, seed=0)
    assert len(history.losses) == 3 and history.losses[-1] < history.losses[0]
    acc = train.evaluate(a, digits.x_test, digits.y_test)
    assert acc.overall > 0.7  # chance is 0.1
    torch.manual_seed(0)
    b = SmallCNN(width=8)
    train.fit(b, digits.x_train, digits.y_train, epochs=3, lr=1e-2, seed=0)
    assert torch.equal(a.head.weight, b.head.weight)


def test_evaluate_per_class_matches_hand_count():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):  # predicts class = first feature
            return nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [1.0], [2.0], [0.0]])
    y = torch.tensor([0, 1, 2, 2, 1])
    acc = train.evaluate(Fixed(), x, y, num_classes=4)
    assert acc.overall == pytest.approx(3 / 5)
    assert acc.overall == 3 / 5 and acc.per_class.dtype == torch.float64   # counts divided in float64: exact at a threshold
    assert acc.per_class[:3].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert torch.isnan(acc.per_class[3])  # class 3 never appears


def test_fit_rejects_bad_arguments(digits):
    model = SmallCNN(width=4)
    with pytest.raises(ValueError, match=r"epochs=0 must be a whole number >= 1, e\.g\. epochs=3\."):
        train.fit(model, digits.x_train, digits.y_train, epochs=0)
    with pytest.raises(ValueError, match="x has 1347 rows but y has 10"):
        train.fit(model, digits.x_train, digits.y_train[:10], epochs=1)


def test_checkpoint_round_trip(tmp_path, digits):
    model = SmallCNN(width=4)
    path = train.save_checkpoint(model, tmp_path / "m.safetensors", {"epochs": 3, "note": "x"})
    raw = path.read_bytes()  # safetensors: u64 header length, JSON header, then the tensors
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["effnb"]) == {"epochs": 3, "note": "x"}
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert header["head.weight"]["shape"] == [10, 8] and header["head.weight"]["dtype"] == "F32"
    other = SmallCNN(width=4)
    assert train.load_checkpoint(other, path) == {"epochs": 3, "note": "x"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nothing\.safetensors does not exist"):
        train.load_checkpoint(SmallCNN(width=4), tmp_path / "nothing.safetensors")


def test_small_cnn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="SmallCNN needs"):
        SmallCNN(num_classes=1)
    assert SmallCNN(in_channels=3, width=8).features(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


# ------------------------------------------------------------------ fault injection: checkpoints
def test_a_flipped_byte_is_caught_when_the_sha256_is_given(tmp_path):
    torch.manual_seed(0)
    path = train.save_checkpoint(SmallCNN(width=4), tmp_path / "m.safetensors")
    digest = sha256_of(path)
    assert train.load_checkpoint(SmallCNN(width=4), path, sha256=digest) == {}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.safetensors is corrupt \(sha256 .* instead of .*\); save it again"):
        train.load_checkpoint(SmallCNN(width=4), path, sha256=digest)


def test_an_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = SmallCNN(width=4)
    path = train.save_checkpoint(old, tmp_path / "m.safetensors", {"version": 1})

    def crash(tensors, filename, metadata=None):  # dies half-way through writing
        Path(filename).write_bytes(b"half a header")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(SmallCNN(width=4), path, {"version": 2})
    other = SmallCNN(width=4)
    assert train.load_checkpoint(other, path) == {"version": 1}
    assert torch.equal(other.head.weight, old.head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file may stay"


def test_listed_checkpoints_record_their_sha256_and_refuse_changed_or_unlisted_files(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    digest = train.save_listed_checkpoint(SmallCNN(width=4), path, {"version": 1})
    assert (tmp_path / "SHA256SUMS").read_text() == f"{digest}  m.safetensors\n" and digest == sha256_of(path)
    before = len(train.LOADED_LISTED)
    assert train.read_listed_checkpoint(path, "re-create it with `make x`", "Checkpoint m") == {"version": 1}
    assert train.LOADED_LISTED[before:] == [path.resolve()], "a checked read is recorded"
    second = train.save_listed_checkpoint(SmallCNN(width=8), path, {"version": 2})   # the entry follows the file
    assert second != digest and (tmp_path / "SHA256SUMS").read_text().count("m.safetensors") == 1
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Checkpoint m is corrupt .*; re-create it with `make x`"):
        train.read_listed_checkpoint(path, "re-create it with `make x`", "Checkpoint m")
    assert len(train.LOADED_LISTED) == before + 1, "a file that failed its check is not recorded"
    (tmp_path / "SHA256SUMS").write_text("")
    with pytest.raises(FileNotFoundError, match=r"^Checkpoint m or its sha256 entry is missing; re-create it with `make x`\.$"):
        train.read_listed_checkpoint(path, "re-create it with `make x`", "Checkpoint m")


def test_an_interrupted_listed_save_leaves_no_entry_for_weights_it_did_not_write(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    train.save_listed_checkpoint(SmallCNN(width=4), path, {"version": 1})
    real = train.write_sha256sums
    calls = []

    def crash_after_dropping(manifest, digests):      # the interrupt hits between steps 1 and 3
        real(manifest, digests)
        calls.append(digests)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_sha256sums", crash_after_dropping)
    with pytest.raises(KeyboardInterrupt):
        train.save_listed_checkpoint(SmallCNN(width=8), path, {"version": 2})
    assert calls == [{}], "the old entry went first"
    with pytest.raises(FileNotFoundError, match="sha256 entry is missing"):
        train.read_listed_checkpoint(path, "re-create it", "Checkpoint m")


# ------------------------------------------------------------------ bad input: one sentence each
@pytest.mark.parametrize("epochs", [1.5, "3", True])
def test_fractional_or_non_int_epochs_are_refused(digits, epochs):
    with pytest.raises(TypeError, match=rf"epochs={epochs!r} must be a whole number >= 1, e\.g\. epochs=3\."):
        train.fit(SmallCNN(width=4), digits.x_train[:8], digits.y_train[:8], epochs=epochs)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_evaluate_refuses_a_batch_size_below_one(digits, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size={batch_size} must be a whole number >= 1, e\.g\. batch_size=512\."):
        train.evaluate(SmallCNN(width=4), digits.x_test, digits.y_test, batch_size=batch_size)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_evaluate_refuses_too_few_classes(digits, num_classes):
    with pytest.raises(ValueError, match=rf"num_classes={num_classes} is too small: y holds the label 9; "
                                         r"pass num_classes=10 or more \(or None\)\."):
        train.evaluate(SmallCNN(width=4), digits.x_test, digits.y_test, num_classes=num_classes)


def test_fit_refuses_labels_the_model_has_no_output_for(digits):
    with pytest.raises(ValueError, match=r"y holds the label 9 but the model gives 5 class scores; "
                                         r"build it with num_classes=10 or more\."):
        train.fit(SmallCNN(width=4, num_classes=5), digits.x_train, digits.y_train, epochs=1)


# ----------------------------------------------------------------------------- dense-prediction metrics
def _one_hot_scores(labels, k):
    return torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def scenes():
    from effnb.data import make_dense_scenes

    return make_dense_scenes(6, size=16, seed=3)


def test_dense_metrics_of_a_perfect_prediction(scenes):
    m = train.dense_metrics(_one_hot_scores(scenes.segmentation, 4), scenes.depth, 3 * scenes.normals,
                            scenes.boundaries * 20 - 10, scenes)
    assert m.miou == pytest.approx(1.0) and m.depth_rmse == pytest.approx(0.0, abs=1e-6)
    assert m.normal_angle < 0.1 and m.boundary_f == pytest.approx(1.0)  # acos near 1 rounds to ~0.02 degrees


def test_dense_metrics_match_hand_counts():
    from effnb.data import DenseScenes

    seg = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255]]])            # (1, 3, 4), one unlabelled pixel
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 1]]])
    depth = torch.full((1, 1, 3, 4), 2.0)
    depth[0, 0, 0, 0] = 0.0                                                         # missing depth: left out
    normals = torch.zeros(1, 3, 3, 4)
    normals[:, 2] = 1.0
    edges = torch.zeros(1, 1, 3, 4)
    edges[0, 0, 0, :2] = 1.0
    target = DenseScenes(torch.zeros(1, 3, 3, 4), seg, depth, normals, edges, num_classes=3)
    pred_depth = depth + 1.0                                                         # off by 1 everywhere
    pred_normals = torch.zeros(1, 3, 3, 4)
    pred_normals[:, 0] = 1.0                                                         # 90 degrees off
    pred_edges = torch.full((1, 1, 3, 4), -1.0)
    pred_edges[0, 0, 0, 0] = pred_edges[0, 0, 2, 3] = 1.0                           # 1 hit, 1 false alarm, 1 miss
    m = train.dense_metrics(_one_hot_scores(pred, 3), pred_depth, pred_normals, pred_edges, target)
    # IoU: class 0 {3 hits; pred 4, true 4} = 3/5; class 1 {4; 5, 4} = 4/5; class 2 {2; 2, 3} = 2/3
    assert m.miou == pytest.approx((3 / 5 + 4 / 5 + 2 / 3) / 3)
    assert m.depth_rmse == pytest.approx(1.0) and m.normal_angle == pytest.approx(90.0)
    assert m.boundary_f == pytest.approx(0.5)                                       # P = R = 1/2


def test_delta_m_signs_and_value():
    ref = train.DenseMetrics(0.5, 1.0, 20.0, 0.8)
    assert str(ref) == "mIoU 0.500, depth RMSE 1.000, normal angle 20.0 deg, boundary F 0.800"
    assert train.delta_m(ref, ref) == 0.0
    better = train.DenseMetrics(0.55, 0.9, 18.0, 0.88)                              # +10% on every task
    assert train.delta_m(better, ref) == pytest.approx(10.0)
    worse = train.DenseMetrics(0.5, 1.2, 20.0, 0.8)                                 # RMSE 20% higher
    assert train.delta_m(worse, ref) == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="reference's miou is 0"):
        train.delta_m(ref, train.DenseMetrics(0.0, 1.0, 20.0, 0.8))


def test_dense_metrics_reject_wrong_shapes(scenes):
    good = (_one_hot_scores(scenes.segmentation, 4), scenes.depth, scenes.normals, scenes.boundaries)
    with pytest.raises(ValueError, match=r"depth has shape \(6, 16, 16\)"):
        train.dense_metrics(good[0], scenes.depth[:, 0], *good[2:], scenes)
    with pytest.raises(ValueError, match="segmentation has shape"):
        train.dense_metrics(good[0][:3], *good[1:], scenes)
