"""effnb.distill and scripts/make_experts.py: flat parameters and the classifier split, the unrolled
student against closed forms, the matching loss, expert trajectories (stage 1 and the class-balanced
stage 2), the synthetic set, evaluation, the torchrun scale-out, and every error message."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effnb import distill as D
from effnb.data import Split
from effnb.models import MLP, ConvNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_experts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_split(n_per_class=(12, 6, 3), seed=0, size=8):
    """A long-tailed toy split: class c is a bright square at a class-specific corner plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])

    def images(y):
        x = 0.1 * torch.rand(len(y), 1, size, size, generator=gen)
        for i, c in enumerate(y.tolist()):
            r, col = divmod(c, 2)
            x[i, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.0
        return x

    y_test = torch.arange(len(n_per_class)).repeat(5)
    return Split(images(ys), ys, images(y_test), y_test, len(n_per_class))


def hand_count(in_channels, width, depth, size, classes):
    """Parameters of MTT's ConvNet by hand: conv (k·k·in·out + out), GroupNorm (2·out), linear."""
    backbone = sum(9 * (in_channels if d == 0 else width) * width + width + 2 * width for d in range(depth))
    features = width * (size // 2**depth) ** 2
    return backbone, features * classes + classes


# ----------------------------------------------------------------------------- ConvNet and the split
@pytest.mark.parametrize("shape", [(1, 16, 2, 8, 10), (3, 8, 3, 32, 10), (1, 4, 1, 8, 3)])
def test_backbone_classifier_split_matches_a_hand_count(shape):
    in_channels, width, depth, size, classes = shape
    model = ConvNet(in_channels, classes, width, depth, size)
    backbone, classifier = hand_count(*shape)
    assert D.ParameterLayout.of(model).size == backbone + classifier == sum(p.numel() for p in model.parameters())
    assert int(D.classifier_mask(model).sum()) == classifier
    assert int(D.parameter_mask(model, "backbone").sum()) == backbone
    assert bool(D.parameter_mask(model, "all").all())
    assert model(torch.zeros(2, in_channels, size, size)).shape == (2, classes)
    assert D.classifier_mask(model)[-classifier:].all()  # the head's parameters come last in this model


def test_classifier_is_the_last_linear_wherever_it_sits():
    mlp = MLP(in_features=5, num_classes=3, hidden=4)  # two linears: only the head counts
    assert int(D.classifier_mask(mlp).sum()) == 4 * 3 + 3
    nested = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), nn.Tanh())
    assert D.classifier_mask(nested).tolist() == [False] * 9 + [True] * 8
    assert bool(D.classifier_mask(nn.Linear(2, 2)).all())


def test_flat_parameters_round_trip_through_the_layout():
    model = ConvNet(1, 3, 4, 1, 8)
    flat = D.flatten_parameters(model)
    other = D.set_flat_parameters(ConvNet(1, 3, 4, 1, 8), flat)
    assert torch.equal(D.flatten_parameters(other), flat)
    views = D.ParameterLayout.of(model).unflatten(flat)
    assert all(torch.equal(views[n], p) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- the unrolled student
def softmax_regression_by_hand(weight, bias, x, target_logits, lr, steps, movable_bias_only=False):
    r"""N SGD steps of softmax regression on soft labels: dL/dz = (p - q) / B, dW = dz^T x, db = sum dz."""
    q = F.softmax(target_logits, dim=1)
    for _ in range(steps):
        dz = (F.softmax(x @ weight.T + bias, dim=1) - q) / len(x)
        if not movable_bias_only:
            weight = weight - lr * dz.T @ x
        bias = bias - lr * dz.sum(0)
    return weight, bias


@pytest.mark.parametrize("bias_only", [False, True])
def test_unrolled_student_on_softmax_regression_matches_the_closed_form(bias_only):
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, targets = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    start = torch.randn(15, generator=gen, dtype=torch.float64)
    movable = torch.tensor([False] * 12 + [True] * 3) if bias_only else None
    end = D.unroll_student(model, start, x, targets, 0.7, steps=5, movable=movable)
    weight, bias = softmax_regression_by_hand(start[:12].view(3, 4), start[12:], x, targets, 0.7, 5, bias_only)
    torch.testing.assert_close(end, torch.cat([weight.reshape(-1), bias]))


def test_unrolled_student_on_least_squares_matches_the_closed_form():
    """Linear least squares with lr alpha: theta_N = (I - alpha A)^N theta_0 + sum_k (I - alpha A)^k alpha b."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    start, alpha, steps = torch.randn(3, generator=gen, dtype=torch.float64), 0.1, 7
    end = D.unroll_student(model, start, x, y, alpha, steps=steps, loss_fn=lambda out, t: 0.5 * (out - t).pow(2).mean())
    a, b = x.T @ x / len(x), (x.T @ y / len(x)).flatten()
    step = torch.eye(3, dtype=torch.float64) - alpha * a
    expected = torch.linalg.matrix_power(step, steps) @ start
    expected = expected + sum(torch.linalg.matrix_power(step, k) @ (alpha * b) for k in range(steps))
    torch.testing.assert_close(end, expected)


def test_gradients_through_the_unrolled_student_match_finite_differences():
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(3, 2).double()
    start, target = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)

    def loss(images, soft_labels, lr):
        end = D.unroll_student(model, start, images, soft_labels, lr, steps=3, batch_size=2,
                               generator=torch.Generator().manual_seed(0))
        return D.matching_loss(end, start, target)

    inputs = (torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(loss, inputs)


# ----------------------------------------------------------------------------- the matching loss
def test_matching_loss_is_zero_on_the_target_and_one_without_moving():
    gen = torch.Generator().manual_seed(3)
    start, target = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    mask = torch.arange(10) < 6
    assert float(D.matching_loss(target, start, target)) == 0.0
    assert float(D.matching_loss(start, start, target)) == pytest.approx(1.0)
    halfway = (start + target) / 2
    assert float(D.matching_loss(halfway, start, target, mask)) == pytest.approx(0.25)
    only_outside = torch.where(mask, target, start)  # right on the masked part, unmoved elsewhere
    assert float(D.matching_loss(only_outside, start, target, mask)) == 0.0


def convnet_phase(match="all", move="all", epochs=4):
    split = tiny_split()
    config = D.ExpertConfig(width=4, depth=2, epochs=epochs, lr=0.2, batch_size=8, classifier_epochs=2)
    experts = [D.make_expert(split, config, seed) for seed in (0, 1)]
    trajectories = torch.stack([e["stage1"] for e in experts])
    phase = D.MatchingPhase(trajectories, start_epochs=(0, 2), expert_epochs=2, student_steps=3, match=match, move=move)
    return split, config.build(split), phase


def test_a_student_with_lr_zero_scores_exactly_one_and_gradients_reach_images_labels_and_lr():
    split, model, phase = convnet_phase()
    synthetic = D.init_synthetic(split.x_train, split.y_train, split.num_classes, ipc=2, lr=0.0)
    assert float(D.phase_loss(model, phase, synthetic).detach()) == pytest.approx(1.0)
    synthetic = D.init_synthetic(split.x_train, split.y_train, split.num_classes, ipc=2, lr=0.05)
    D.phase_loss(model, phase, synthetic).backward()
    for grad in (synthetic.images.grad, synthetic.soft_labels.grad, synthetic.lr.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_classifier_only_student_leaves_the_backbone_loss_at_one():
    split, model, phase = convnet_phase(match="backbone", move="classifier")
    synthetic = D.init_synthetic(split.x_train, split.y_train, split.num_classes, ipc=2, lr=0.5)
    assert float(D.phase_loss(model, phase, synthetic).detach()) == pytest.approx(1.0)


def test_distill_updates_the_synthetic_set_and_records_each_loss():
    split, model, phase = convnet_phase()
    synthetic = D.init_synthetic(split.x_train, split.y_train, split.num_classes, ipc=2, lr=0.05)
    before = synthetic.detached()
    weighted = D.MatchingPhase(phase.trajectories, weight=0.5, start_epochs=(0, 2), student_steps=2,
                               loss_fn=lambda z, t: 2 * D.soft_cross_entropy(z, t), match="backbone")
    losses = D.distill(model, synthetic, [phase, weighted], iterations=3, image_lr=1.0, label_lr=1.0, lr_lr=1e-3)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    assert not torch.equal(before.images, synthetic.images)
    assert not torch.equal(before.soft_labels, synthetic.soft_labels) and float(before.lr) != float(synthetic.lr.detach())


# ----------------------------------------------------------------------------- experts
def test_retraining_the_classifier_leaves_the_backbone_bit_identical():
    split = tiny_split()
    torch.manual_seed(0)
    model = ConvNet(1, 3, 4, 2, 8)
    D.train_expert(model, split.x_train, split.y_train, epochs=2, lr=0.2, batch_size=8)
    trajectory = D.retrain_classifier(model, split.x_train, split.y_train, 3, epochs=3, lr=0.5, batch_size=8)
    backbone = D.parameter_mask(model, "backbone")
    assert trajectory.shape == (4, D.ParameterLayout.of(model).size)
    assert all(torch.equal(row[backbone], trajectory[0][backbone]) for row in trajectory)
    assert not torch.equal(trajectory[-1][~backbone], trajectory[0][~backbone])
    assert all(p.requires_grad for p in model.parameters())


def test_class_balanced_indices_draw_every_class_equally_often():
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    idx = D.class_balanced_indices(y, 4, 30000, torch.Generator().manual_seed(0))  # class 3 is absent
    counts = torch.bincount(y[idx], minlength=4).float() / 30000
    assert counts[3] == 0 and torch.allclose(counts[:3], torch.full((3,), 1 / 3), atol=0.02)


def test_expert_trajectories_start_at_the_init_and_repeat_with_the_seed():
    split = tiny_split()
    config = D.ExpertConfig(width=4, depth=2, epochs=3, lr=0.2, batch_size=8, classifier_epochs=2)
    state = torch.get_rng_state()
    first, again, other = (D.make_expert(split, config, s) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)
    assert first["stage1"].shape == (4, sum(hand_count(1, 4, 2, 8, 3)))
    assert first["stage2"].shape[0] == 3 and torch.equal(first["stage2"][0], first["stage1"][-1])
    assert all(torch.equal(first[k], again[k]) for k in first) and not torch.equal(first["stage1"], other["stage1"])
    torch.manual_seed(5)
    assert torch.equal(first["stage1"][0], D.flatten_parameters(config.build(split)))


def test_expert_seeds_depend_on_the_pair_only():
    seeds = {D.expert_seed(base, i) for base in range(3) for i in range(20)}
    assert len(seeds) == 60 and D.expert_seed(0, 1) != D.expert_seed(1, 0) and D.expert_seed(2, 3) == D.expert_seed(2, 3)


def test_experts_round_trip_through_safetensors(tmp_path):
    trajectories = {"stage1": torch.randn(3, 5), "stage2": torch.randn(2, 5)}
    for i in range(2):
        D.save_expert(tmp_path / f"expert_{i:03d}.safetensors", trajectories, {"index": i})
    loaded, meta = D.load_expert(tmp_path / "expert_001.safetensors")
    assert meta == {"index": 1} and all(torch.equal(loaded[k], trajectories[k]) for k in trajectories)
    experts = D.load_experts(tmp_path)
    assert experts.stage1.shape == (2, 3, 5) and experts.stage2.shape == (2, 2, 5) and experts.metadata == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- synthetic set and evaluation
def test_init_takes_correctly_classified_images_and_averages_the_right_experts_logits():
    x, y = torch.arange(5.0).view(5, 1), torch.tensor([0, 0, 1, 1, 1])
    logits = torch.tensor([[[2.0, 0], [0, 2], [0, 4], [0, 1], [1, 0]],    # expert 0: right on 0, 2, 3
                           [[4.0, 0], [0, 1], [0, 2], [3, 0], [2, 0]]])   # expert 1: right on 0, 2
    synthetic = D.init_synthetic(x, y, 2, ipc=2, logits=logits, seed=0)
    assert synthetic.classes.tolist() == [0, 0, 1, 1]
    assert synthetic.images[:2].flatten().tolist() == [0.0, 0.0]  # class 0: only image 0 is right, repeated
    assert sorted(synthetic.images[2:].flatten().tolist()) == [2.0, 3.0]  # image 4 is never right
    torch.testing.assert_close(synthetic.soft_labels[0], torch.tensor([3.0, 0.0]))  # mean of both experts
    row3 = synthetic.images[2:].flatten().tolist().index(3.0) + 2
    torch.testing.assert_close(synthetic.soft_labels[row3], torch.tensor([0.0, 1.0]))  # expert 0 only
    plain = D.init_synthetic(x, y, 2, ipc=3, seed=0)
    assert plain.soft_labels.tolist()[0] == [10.0, 0.0] and plain.images.requires_grad and plain.lr.requires_grad


def test_expert_soft_labels_average_only_the_right_experts_and_all_when_none_is_right():
    y = torch.tensor([0, 1])
    logits = torch.tensor([[[2.0, 0], [3, 0]],     # expert 0: right on image 0, wrong on image 1
                           [[0.0, 1], [5, 1]]])    # expert 1: wrong on both
    labels, right = D.expert_soft_labels(logits, y)
    torch.testing.assert_close(labels, torch.tensor([[2.0, 0], [4, 0.5]]))   # image 1: the mean of both
    assert right.tolist() == [True, False]


def test_expert_logits_equal_the_model_loaded_with_each_expert():
    split = tiny_split()
    model = ConvNet(1, 3, 4, 2, 8)
    params = torch.stack([D.flatten_parameters(ConvNet(1, 3, 4, 2, 8)) for _ in range(2)])
    logits = D.expert_logits(model, params, split.x_test)
    assert logits.shape == (2, len(split.x_test), 3)
    torch.testing.assert_close(logits[1], D.set_flat_parameters(model, params[1])(split.x_test))


def test_expert_logits_move_experts_stored_on_the_host_to_the_inputs_device():
    from effnb.config import DeviceCheck
    split = tiny_split()
    params = torch.stack([D.flatten_parameters(ConvNet(1, 3, 4, 2, 8)) for _ in range(2)])   # on the host, as stored
    with DeviceCheck():                                  # a GPU's placement, followed on the CPU
        model, x = ConvNet(1, 3, 4, 2, 8).to("cpu"), split.x_test.to("cpu")
        assert D.expert_logits(model, params, x).shape == (2, len(x), 3)


def test_soft_label_training_equals_hard_label_training_for_one_hot_labels():
    split = tiny_split()
    torch.manual_seed(0)
    init = ConvNet(1, 3, 4, 2, 8)
    hard, soft = (D.set_flat_parameters(ConvNet(1, 3, 4, 2, 8), D.flatten_parameters(init)) for _ in range(2))
    D.train_on_synthetic(hard, split.x_train, split.y_train, epochs=3, lr=0.1, batch_size=8)
    D.train_on_synthetic(soft, split.x_train, 1e4 * F.one_hot(split.y_train, 3).float(), epochs=3, lr=0.1, batch_size=8)
    torch.testing.assert_close(D.flatten_parameters(soft), D.flatten_parameters(hard), atol=1e-5, rtol=1e-5)


def test_evaluation_reports_overall_and_per_class_accuracy_on_the_test_set():
    split = tiny_split()
    torch.manual_seed(0)
    idx = D.select_per_class(split.y_train, 3, ipc=3)
    accuracy = D.evaluate_synthetic(ConvNet(1, 3, 8, 2, 8), split.x_train[idx], split.y_train[idx], split, epochs=30,
                                    lr=0.05, batch_size=9)
    assert accuracy.per_class.shape == (3,) and accuracy.overall == pytest.approx(float(accuracy.per_class.mean()))
    assert accuracy.overall > 0.9  # the toy classes are easy: the loop really trains
    assert D.head_tail_accuracy(torch.tensor([1.0, 0.5, 0.2, 0.0]), torch.tensor([5, 50, 1, 9])) == pytest.approx((0.25, 0.6))


def test_long_tailed_digits_keep_a_balanced_test_set():
    split = D.long_tailed_split("digits", 10)
    counts = torch.bincount(split.y_train).tolist()
    assert counts[0] // counts[-1] == 10 and counts == sorted(counts, reverse=True)
    test_counts = torch.bincount(split.y_test)
    assert int(test_counts.min()) >= 0.9 * int(test_counts.max())


# ----------------------------------------------------------------------------- scripts/make_experts.py
TINY = ["--experts", "3", "--epochs", "2", "--classifier-epochs", "2", "--width", "4", "--batch", "128"]


def test_two_torchrun_ranks_write_the_same_experts_as_one_process(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert make_experts.main([*TINY, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "scripts" / "make_experts.py"),
               *TINY, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = D.load_experts(tmp_path / "one"), D.load_experts(tmp_path / "two")
    assert one.stage1.shape[0] == 3 and torch.equal(one.stage1, two.stage1) and torch.equal(one.stage2, two.stage2)
    assert two.metadata["world_size"] == 2 and two.metadata["config"]["width"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no staging folder left behind


def test_a_failing_run_leaves_neither_the_output_nor_a_staging_folder(tmp_path, monkeypatch):
    def fail_on_second(split, config, seed, device):
        if seed == D.expert_seed(0, 1):
            raise RuntimeError("disk full")
        return real(split, config, seed, device)

    real = make_experts.make_expert
    monkeypatch.setattr(make_experts, "make_expert", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        make_experts.main([*TINY, "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_finished_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert make_experts.main([*TINY, "--experts", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["expert_000.safetensors", "metadata.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("args,message", [
    (["--experts", "0"], "--experts=0 must be >= 1; e.g. --experts 8."),
    (["--epochs", "0"], "--epochs=0 must be >= 1; e.g. --epochs 20."),
    (["--batch", "-1"], "--batch=-1 must be >= 1; e.g. --batch 64."),
    (["--classifier-epochs", "-1"], "--classifier-epochs=-1 must be >= 0."),
    (["--weight-decay", "-0.1"], "--weight-decay=-0.1 must be >= 0."),
    (["--lr", "0"], "--lr=0.0 and --classifier-lr=0.1 must both be > 0, e.g. --lr 0.2."),
    (["--imbalance", "0.5"], "--imbalance=0.5 must be >= 1 (largest class / smallest class), e.g. 10."),
    (["--data", "cifar10"], "--data cifar10 needs --root DIR (a folder for cifar-10-binary.tar.gz; add --download to fetch it)."),
    (["--download"], "--root and --download apply only to --data cifar10; drop them for the bundled digits."),
    (["--depth", "4"], "--depth=4 halves the 8x8 images too often; use --depth <= 3."),
])
def test_bad_arguments_fail_early_with_one_sentence(tmp_path, capsys, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_experts.settings([*args, "--out", str(tmp_path / "out")])
    assert make_experts.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"make_experts.py: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(ValueError, match=re.escape(f"--out {tmp_path / 'out'} already holds files; pass --overwrite")):
        make_experts.settings(["--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- the library's errors
def test_library_errors_name_the_fix(tmp_path):
    model = ConvNet(1, 3, 4, 2, 8)
    trajectories = torch.zeros(2, 5, D.ParameterLayout.of(model).size)
    cases = [
        (lambda: D.ParameterLayout.of(model).unflatten(torch.zeros(3)),
         ValueError, f"a flat parameter vector of this model has shape ({trajectories.shape[-1]},); got (3,)."),
        (lambda: D.classifier_mask(nn.Conv2d(1, 1, 1)),
         ValueError, "Conv2d has no nn.Linear, so it has no classifier to split off; give it a linear head."),
        (lambda: D.parameter_mask(model, "head"),
         ValueError, "part='head' is not valid; use one of 'all', 'backbone', 'classifier'."),
        (lambda: D.long_tailed_split("mnist"), ValueError, "data='mnist' is not valid; use one of 'digits', 'cifar10'."),
        (lambda: D.long_tailed_split("cifar10"), ValueError,
         "data='cifar10' needs root= (a folder holding cifar-10-binary.tar.gz; add download=True to fetch it)."),
        (lambda: D.select_per_class(torch.tensor([0, 0, 2]), 3, 1), ValueError,
         "class 1 has no samples; every class needs at least one (lower the imbalance)."),
        (lambda: D.select_per_class(torch.tensor([0, 1]), 2, 0), ValueError, "ipc=0 must be a whole number >= 1, e.g. ipc=10."),
        (lambda: D.MatchingPhase(trajectories, match="head"), ValueError,
         "match='head' is not valid; use one of 'all', 'backbone', 'classifier'."),
        (lambda: D.MatchingPhase(trajectories, move="bias"), ValueError,
         "move='bias' is not valid; use one of 'all', 'backbone', 'classifier'."),
        (lambda: D.MatchingPhase(trajectories[0]), ValueError,
         f"trajectories must be (experts, epochs + 1, P); got shape (5, {trajectories.shape[-1]})."),
        (lambda: D.MatchingPhase(trajectories, start_epochs=(0, 4)), ValueError,
         "start_epochs=(0, 4) with expert_epochs=2 needs 0 <= low < high and high - 1 + expert_epochs <= 4 "
         "(the experts' epochs); lower high or expert_epochs, or train longer experts."),
        (lambda: D.distill(model, None, [], iterations=1), ValueError, "phases is empty; pass at least one MatchingPhase."),
        (lambda: D.distill(model, None, [], iterations=0), ValueError,
         "iterations=0 must be a whole number >= 1, e.g. iterations=100."),
        (lambda: D.unroll_student(model, trajectories[0, 0], torch.zeros(1, 1, 8, 8), torch.zeros(1, 3), 0.1, steps=0),
         ValueError, "steps=0 must be a whole number >= 1, e.g. steps=20."),
        (lambda: D.train_expert(model, torch.zeros(1, 1, 8, 8), torch.zeros(1).long(), epochs=0), ValueError,
         "epochs=0 must be a whole number >= 1, e.g. epochs=20."),
        (lambda: D.retrain_classifier(model, torch.zeros(1, 1, 8, 8), torch.zeros(1).long(), 3, epochs=0), ValueError,
         "epochs=0 must be a whole number >= 1, e.g. epochs=10."),
        (lambda: D.load_expert(tmp_path / "expert_000.safetensors"), FileNotFoundError,
         f"no expert file at {tmp_path / 'expert_000.safetensors'}; make experts first with scripts/make_experts.py."),
        (lambda: D.load_experts(tmp_path), FileNotFoundError,
         f"{tmp_path} holds no expert_*.safetensors; make them with scripts/make_experts.py."),
        (lambda: ConvNet(1, 1, 4, 2, 8), ValueError,
         "ConvNet needs in_channels, width, depth, image_size >= 1 and num_classes >= 2; got 1, 4, 2, 8 and 1."),
        (lambda: ConvNet(1, 10, 4, 4, 8), ValueError,
         "image_size=8 must be divisible by 2**depth = 16; use depth <= 3 or another image size."),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            call()


# ----------------------------------------------------------------------------- Chapter 4's parameters and experts
CHAPTER = ROOT / "notebooks" / "04_lad.ipynb"


def run_chapter_head(upto: str, **parameters) -> dict:
    """Execute Chapter 4's code cells in this process, from its parameters cell (``parameters`` injected after
    it, as papermill does) to the first cell containing ``upto``; return the chapter's namespace."""
    import matplotlib
    import matplotlib.pyplot as plt
    import nbformat

    cells = [c for c in nbformat.read(CHAPTER, as_version=4).cells if c.cell_type == "code"]
    start = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    threads = torch.get_num_threads()
    try:
        with matplotlib.rc_context():
            exec(cells[start].source, namespace)
            namespace.update(parameters)
            for cell in cells[start + 1:]:
                exec(cell.source, namespace)
                if upto in cell.source:
                    return namespace
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
    raise AssertionError(f"no code cell of {CHAPTER.name} contains {upto!r}")


@pytest.mark.parametrize("parameters, error, message", [
    ({"DOWNLOAD": "yes"}, ValueError, "DOWNLOAD='yes' must be True or False"),
    ({"CIFAR_ROOT": "data/cifar10"}, ValueError, "CIFAR_ROOT needs PROFILE = 'full'"),
    ({"DOWNLOAD": True}, ValueError, "DOWNLOAD = True needs CIFAR_ROOT"),
    ({"EXPERTS_DIR": "no/such/folder"}, FileNotFoundError, "needs subfolders b10 and b50; make them with"),
    ({"IPC": 0}, ValueError, "IPC"),
])
def test_chapter_refuses_bad_parameters_before_any_work(parameters, error, message):
    with pytest.raises(error, match=re.escape(message)):
        run_chapter_head('DATA = "cifar10" if CIFAR_ROOT', **parameters)


def test_chapter_reads_the_experts_the_script_makes_and_refuses_other_shapes(tmp_path):
    for beta in (10, 50):
        assert make_experts.main(["--experts", "2", "--imbalance", str(beta), "--out", str(tmp_path / "ok" / f"b{beta}")]) == 0
        assert make_experts.main([*TINY, "--imbalance", str(beta), "--out", str(tmp_path / "other" / f"b{beta}")]) == 0
    chapter = run_chapter_head("experts, expert_seconds = {}, {}", EXPERTS_DIR=str(tmp_path / "ok"))
    made = D.make_expert(chapter["splits"][50], chapter["CONFIG"], D.expert_seed(0, 1))
    assert chapter["experts"][50]["stage1"].shape[:2] == (2, chapter["CONFIG"].epochs + 1)
    assert torch.equal(chapter["experts"][50]["stage1"][1], made["stage1"]), "the script makes the chapter's own experts"
    assert torch.equal(chapter["experts"][50]["stage2"][1], made["stage2"])
    with pytest.raises(ValueError, match=re.escape("make them with scripts/make_experts.py --width 16 --depth 2")):
        run_chapter_head("experts, expert_seconds = {}, {}", EXPERTS_DIR=str(tmp_path / "other"))


def test_chapter_refuses_experts_of_another_imbalance_or_data_seed(tmp_path):
    for folder, beta_10, beta_50 in (("swapped", "50", "10"), ("reseeded", "10", "50")):
        extra = ["--data-seed", "1"] if folder == "reseeded" else []
        for beta, made_at in ((10, beta_10), (50, beta_50)):
            out = tmp_path / folder / f"b{beta}"
            assert make_experts.main(["--experts", "1", "--imbalance", made_at, *extra, "--out", str(out)]) == 0
    with pytest.raises(ValueError, match=re.escape("holds experts made from {'data': 'digits', 'imbalance': 50.0, "
                                                   "'data_seed': 0}, not from this chapter's data 'digits' at imbalance 10")):
        run_chapter_head("experts, expert_seconds = {}, {}", EXPERTS_DIR=str(tmp_path / "swapped"))
    with pytest.raises(ValueError, match=re.escape("make them with scripts/make_experts.py --data digits --imbalance 10 "
                                                   "--data-seed 0 --out")):
        run_chapter_head("experts, expert_seconds = {}, {}", EXPERTS_DIR=str(tmp_path / "reseeded"))
