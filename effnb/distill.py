r"""Dataset distillation by trajectory matching (MTT, DATM) and its long-tailed fix (LAD).

Three parts, in the order a chapter uses them:

1. **Expert trajectories.** Train small networks on the real (long-tailed) data and keep their
   parameters after every epoch (:func:`train_expert`); optionally retrain only the classifier of
   each with a class-balanced sampler (:func:`retrain_classifier`, LAD's stage-2 experts).
   :func:`make_expert` does both for one expert, :func:`save_expert` / :func:`load_experts` keep
   them in safetensors files; ``scripts/make_experts.py`` makes many in parallel.
2. **Trajectory matching.** A learnable synthetic set (images, soft labels, a student learning
   rate; :class:`SyntheticSet`) is tuned so that a student trained on it for :math:`N` steps from
   an expert's epoch :math:`s` lands near the same expert's epoch :math:`s+M`
   (:func:`unroll_student`, :func:`matching_loss`, :func:`distill`). Which parameters move and which
   are compared are masks computed from the model (:func:`parameter_mask`), never typed indices.
3. **Evaluation.** Train a fresh network on the synthetic set and test it on a balanced test set
   (:func:`evaluate_synthetic`, :func:`head_tail_accuracy`).

A network is handled as one flat vector :math:`\theta \in \mathbb{R}^P` in the order of
``model.named_parameters()`` (:class:`ParameterLayout`); the student runs through
``torch.func.functional_call``, so gradients flow from the matching loss back through every
unrolled step into the images, the soft labels and the learning rate. Introduced in Chapter 4.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from effnb.config import check_choice, check_count
from effnb.data import Split, atomic_path, load_cifar10, load_digits, long_tail_subset
from effnb.models import ConvNet
from effnb.train import Accuracy, evaluate, fit

__all__ = [
    "DATA_SETS",
    "PARTS",
    "ExpertConfig",
    "Experts",
    "MatchingPhase",
    "ParameterLayout",
    "SyntheticSet",
    "class_balanced_indices",
    "classifier_mask",
    "distill",
    "evaluate_synthetic",
    "expert_logits",
    "expert_seed",
    "expert_soft_labels",
    "flatten_parameters",
    "head_tail_accuracy",
    "init_synthetic",
    "load_expert",
    "load_experts",
    "long_tailed_split",
    "make_expert",
    "matching_loss",
    "parameter_mask",
    "phase_loss",
    "retrain_classifier",
    "save_expert",
    "select_per_class",
    "set_flat_parameters",
    "soft_cross_entropy",
    "train_expert",
    "train_on_synthetic",
    "unroll_student",
]

DATA_SETS: tuple[str, ...] = ("digits", "cifar10")
PARTS: tuple[str, ...] = ("all", "backbone", "classifier")
StudentLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- flat parameters
@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a model's parameters, in ``named_parameters()`` order: the map between
    the flat vector :math:`\\theta \\in \\mathbb{R}^P` and the dict ``functional_call`` needs."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        """The layout of ``model``."""
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each parameter."""
        return [s.numel() for s in self.shapes]

    @property
    def size(self) -> int:
        """:math:`P`, the length of the flat vector."""
        return sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view of flat}``, shaped like the model's parameters (differentiable)."""
        if flat.shape != (self.size,):
            raise ValueError(f"a flat parameter vector of this model has shape ({self.size},); "
                             f"got {tuple(flat.shape)}.")
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """``model``'s parameters as one detached vector ``(P,)`` on the CPU, in :class:`ParameterLayout` order."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


@torch.no_grad()
def set_flat_parameters(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy the flat vector ``flat (P,)`` into ``model``'s parameters; returns ``model``."""
    for param, value in zip(model.parameters(), ParameterLayout.of(model).unflatten(flat).values()):
        param.copy_(value)
    return model


def classifier_mask(model: nn.Module) -> torch.Tensor:
    """Boolean ``(P,)``: True on the parameters of the model's last ``nn.Linear`` (the classifier).

    Found from the modules, so it holds for any network whose head is its last linear layer.
    Raises ``ValueError`` for a model without an ``nn.Linear``.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear, so it has no classifier to split off; "
                         "give it a linear head.")
    prefix = f"{linears[-1]}." if linears[-1] else ""
    layout = ParameterLayout.of(model)
    return torch.cat([torch.full((size,), name.startswith(prefix) and "." not in name[len(prefix):])
                      for name, size in zip(layout.names, layout.sizes)])


def parameter_mask(model: nn.Module, part: str) -> torch.Tensor:
    """Boolean ``(P,)`` selecting ``part`` of the parameters: ``"all"``, ``"backbone"`` (everything but
    the classifier) or ``"classifier"`` (:func:`classifier_mask`)."""
    check_choice("part", part, PARTS)
    if part == "all":
        return torch.ones(ParameterLayout.of(model).size, dtype=torch.bool)
    head = classifier_mask(model)
    return head if part == "classifier" else ~head


# ----------------------------------------------------------------------------- data and experts
def long_tailed_split(data: str = "digits", imbalance: float = 10.0, *, root: str | Path | None = None,
                      download: bool = False, seed: int = 0) -> Split:
    r"""A :class:`effnb.data.Split` whose training set is long-tailed (class :math:`c` keeps
    :math:`\lfloor n_{max}\beta^{-c/(C-1)}\rfloor` images) and whose test set stays balanced.

    ``data`` is ``"digits"`` (bundled, 8×8) or ``"cifar10"`` (32×32, read from ``root``; fetched
    only with ``download=True``). ``seed`` picks which images are kept.
    """
    check_choice("data", data, DATA_SETS)
    if data == "cifar10" and root is None:
        raise ValueError("data='cifar10' needs root= (a folder holding cifar-10-binary.tar.gz; "
                         "add download=True to fetch it).")
    split = load_digits(size=8) if data == "digits" else load_cifar10(root, download=download)
    x, y = long_tail_subset(split.x_train, split.y_train, split.num_classes, imbalance, seed=seed)
    return Split(x, y, split.x_test, split.y_test, split.num_classes)


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index`` under base ``seed``: a function of the pair only (NumPy's
    ``SeedSequence``), so experts do not depend on how they are split across processes and the
    experts of base seeds 0 and 1 do not overlap."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def class_balanced_indices(y: torch.Tensor, num_classes: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices into ``y`` drawn class-balanced: a class uniformly among those present, then one of
    its samples uniformly (with replacement), so every class is seen equally often."""
    y = y.cpu()
    members = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    members = [m for m in members if len(m)]
    classes = torch.randint(len(members), (n,), generator=generator)
    picks = torch.rand(n, generator=generator)
    return torch.stack([members[c][int(p * len(members[c]))] for c, p in zip(classes.tolist(), picks.tolist())])


def train_expert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.01,
                 batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.0,
                 seed: int = 0) -> torch.Tensor:
    r"""Train ``model`` with SGD and return its trajectory ``(epochs + 1, P)``: row ``e`` is
    :math:`\theta^*_e`, the parameters after ``e`` epochs (row 0 = the initialisation).

    ``weight_decay`` > 0 is LAD's *weight balancing*: it keeps the classifier rows of frequent classes
    from growing larger than those of rare ones. Epoch ``e`` shuffles with seed ``seed + e``.
    """
    check_count("epochs", epochs, 20)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    snapshots = [flatten_parameters(model)]
    for epoch in range(epochs):
        fit(model, x, y, epochs=1, batch_size=batch_size, optimizer=optimizer, seed=seed + epoch, progress=False)
        snapshots.append(flatten_parameters(model))
    return torch.stack(snapshots)


def retrain_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int,
                       lr: float = 0.01, batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """LAD's stage-2 expert: freeze everything but the classifier (:func:`classifier_mask`) and retrain it
    with SGD on class-balanced batches (:func:`class_balanced_indices`, ``len(y)`` draws per epoch).

    Returns the trajectory ``(epochs + 1, P)``; row 0 is the model as given. The backbone's entries
    stay bit-identical, since the optimizer never sees them.
    """
    check_count("epochs", epochs, 10)
    head = classifier_mask(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    in_head = [bool(m.all()) for m in head.split(ParameterLayout.of(model).sizes)]
    optimizer = torch.optim.SGD([p for p, h in zip(params, in_head) if h], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    snapshots = [flatten_parameters(model)]
    try:
        for p, h in zip(params, in_head):
            p.requires_grad_(h)
        for epoch in range(epochs):
            idx = class_balanced_indices(y, num_classes, len(y), gen)
            fit(model, x[idx], y[idx], epochs=1, batch_size=batch_size, optimizer=optimizer, seed=seed + epoch,
                progress=False)
            snapshots.append(flatten_parameters(model))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return torch.stack(snapshots)


@dataclass(frozen=True)
class ExpertConfig:
    """Settings of one expert: its :class:`effnb.models.ConvNet` (``width``, ``depth``), stage 1
    (``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``momentum``) and stage 2
    (``classifier_epochs``, 0 for none; ``classifier_lr``).

    The defaults learn digits 8×8 in about 0.5 s an expert on one CPU thread (depth 3 leaves a 1×1
    map there and learns far slower); LAD's CIFAR-10 experts are width 128, depth 3, lr 0.01, batch 256.
    """

    width: int = 16
    depth: int = 2
    epochs: int = 20
    lr: float = 0.2
    batch_size: int = 64
    weight_decay: float = 5e-3
    momentum: float = 0.0
    classifier_epochs: int = 5
    classifier_lr: float = 0.1

    def build(self, split: Split) -> ConvNet:
        """A fresh ConvNet for ``split``'s image shape and classes (initialised from torch's global RNG)."""
        channels, size, _ = split.image_shape
        return ConvNet(channels, split.num_classes, self.width, self.depth, size)


def make_expert(split: Split, config: ExpertConfig, seed: int,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Initialise a ConvNet from ``seed`` and train it on ``split``'s training set: ``{"stage1": (E+1, P)}``
    (:func:`train_expert`), plus ``"stage2": (K+1, P)`` when ``config.classifier_epochs`` = K > 0
    (:func:`retrain_classifier`, starting from stage 1's last epoch). Leaves torch's global RNG as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = config.build(split).to(device)
    out = {"stage1": train_expert(model, split.x_train, split.y_train, epochs=config.epochs, lr=config.lr,
                                  batch_size=config.batch_size, weight_decay=config.weight_decay,
                                  momentum=config.momentum, seed=seed)}
    if config.classifier_epochs > 0:
        out["stage2"] = retrain_classifier(model, split.x_train, split.y_train, split.num_classes,
                                           epochs=config.classifier_epochs, lr=config.classifier_lr,
                                           batch_size=config.batch_size, seed=seed)
    return out


def save_expert(path: str | Path, trajectories: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write one expert's trajectories (``{"stage1": (E+1, P), ...}``) to a safetensors file, all at once
    (:func:`effnb.data.atomic_path`); ``metadata`` (JSON-serialisable) travels in the header."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trajectories.items()}, str(tmp),
                  metadata={"effnb": json.dumps(metadata)})
    return path


def load_expert(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(trajectories, metadata)`` of a :func:`save_expert` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no expert file at {path}; make experts first with scripts/make_experts.py.")
    with safe_open(str(path), framework="pt") as fh:
        metadata = json.loads((fh.metadata() or {}).get("effnb", "{}"))
    return load_file(str(path)), metadata


@dataclass(frozen=True)
class Experts:
    """A folder of experts stacked: ``stage1 (N, E+1, P)``, ``stage2 (N, K+1, P)`` or ``None``, and the
    folder's ``metadata`` (its ``metadata.json``)."""

    stage1: torch.Tensor
    stage2: torch.Tensor | None
    metadata: dict


def load_experts(directory: str | Path) -> Experts:
    """Stack every ``expert_*.safetensors`` of a ``scripts/make_experts.py`` folder, in index order."""
    directory = Path(directory)
    files = sorted(directory.glob("expert_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no expert_*.safetensors; make them with scripts/make_experts.py.")
    loaded = [load_expert(f)[0] for f in files]
    meta_path = directory / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    stage2 = torch.stack([t["stage2"] for t in loaded]) if "stage2" in loaded[0] else None
    return Experts(torch.stack([t["stage1"] for t in loaded]), stage2, metadata)


# ----------------------------------------------------------------------------- the synthetic set
def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    r"""Soft cross-entropy :math:`L = -\frac1B \sum_i \sum_j \mathrm{softmax}(\tilde y_i)_j \log p_j(x_i)`
    of ``logits (B, C)`` against soft labels given as logits ``target_logits`` :math:`\tilde y` ``(B, C)``."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


@dataclass
class SyntheticSet:
    """The learnable distilled set: ``images (n, C, H, W)``, ``soft_labels (n, classes)`` (logits),
    the student learning rate ``lr`` (a scalar), and ``classes (n,)``, the class each image stands for.
    ``images``, ``soft_labels`` and ``lr`` are leaf tensors that require grad."""

    images: torch.Tensor
    soft_labels: torch.Tensor
    lr: torch.Tensor
    classes: torch.Tensor

    def detached(self) -> SyntheticSet:
        """A copy that no longer tracks gradients (to evaluate or store)."""
        return SyntheticSet(self.images.detach().clone(), self.soft_labels.detach().clone(),
                            self.lr.detach().clone(), self.classes.clone())


@torch.no_grad()
def expert_logits(model: nn.Module, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(K, N, classes)`` of ``x (N, ...)`` under each of ``K`` flat parameter vectors ``params (K, P)``
    (e.g. ``experts.stage2[:, -1]``, the classifier experts' last epoch), ``model`` giving the architecture.
    ``params`` may live on the CPU (experts are stored there); each vector is moved to ``x``'s device."""
    layout = ParameterLayout.of(model)
    return torch.stack([functional_call(model, layout.unflatten(p.to(x.device)), (x,)) for p in params])


def select_per_class(y: torch.Tensor, num_classes: int, ipc: int, seed: int = 0,
                     preferred: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(num_classes · ipc,)`` of ``ipc`` samples per class, class by class, at random with ``seed``.

    Where the boolean ``preferred`` marks some of a class's samples, only those are used; a class with
    fewer than ``ipc`` usable samples repeats them (LAD duplicates images up to IPC). Raises
    ``ValueError`` for an empty class.
    """
    check_count("ipc", ipc, 10)
    gen = torch.Generator().manual_seed(seed)
    y = y.cpu()  # the indices are drawn on the CPU, whatever device y lives on
    preferred = torch.ones(len(y), dtype=torch.bool) if preferred is None else preferred.bool().cpu()
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if not len(members):
            raise ValueError(f"class {c} has no samples; every class needs at least one (lower the imbalance).")
        members = members[torch.randperm(len(members), generator=gen)]
        members = members[preferred[members]] if preferred[members].any() else members
        chosen.append(members[torch.arange(ipc) % len(members)])
    return torch.cat(chosen)


def expert_soft_labels(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LAD's soft labels from expert ``logits (K, N, classes)`` of images labelled ``y (N,)``: each image's
    mean logit over the experts that classify it correctly (over all ``K`` when none does), ``(N, classes)``,
    and ``(N,)`` booleans marking the images that at least one expert gets right."""
    right = (logits.argmax(-1) == y.to(logits.device)).float()  # (K, N)
    weights = torch.where(right.sum(0) > 0, right, torch.ones_like(right))
    return (weights[..., None] * logits).sum(0) / weights.sum(0)[:, None], right.sum(0) > 0


def init_synthetic(x: torch.Tensor, y: torch.Tensor, num_classes: int, ipc: int, *, lr: float = 0.01,
                   logits: torch.Tensor | None = None, seed: int = 0) -> SyntheticSet:
    """Start the synthetic set from ``ipc`` real images per class (:func:`select_per_class`).

    With expert ``logits (K, N, classes)`` of all of ``x`` (:func:`expert_logits`), images that some expert
    classifies correctly are preferred, and an image's soft label is the mean logit over the experts
    that classify it correctly (over all experts when none does): LAD's initialisation. Without, the
    soft labels are one-hot logits scaled by 10 (softmax ≈ 0.9996 on the true class).
    """
    if logits is None:
        targets = 10.0 * F.one_hot(y, num_classes).float()
        preferred = None
    else:
        targets, preferred = expert_soft_labels(logits, y)
    idx = select_per_class(y, num_classes, ipc, seed, preferred)
    return SyntheticSet(x[idx].clone().requires_grad_(True), targets[idx].clone().requires_grad_(True),
                        torch.tensor(float(lr), requires_grad=True), y[idx].clone())


# ----------------------------------------------------------------------------- trajectory matching
def unroll_student(model: nn.Module, start: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                   lr: torch.Tensor | float, *, steps: int, loss_fn: StudentLoss = soft_cross_entropy,
                   batch_size: int | None = None, movable: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Train a student ``steps`` SGD steps from the flat parameters ``start (P,)`` and return where it ends.

    .. math:: \hat\theta_{k+1} = \hat\theta_k - \alpha \, m \odot \nabla_\theta\, \ell\big(f(X_{B_k}; \hat\theta_k), \tilde Y_{B_k}\big), \quad \hat\theta_0 = \theta^*_s

    ``model`` gives the architecture (its own weights are not used); :math:`\ell` is ``loss_fn(logits,
    targets)``; :math:`B_k` are mini-batches of ``batch_size`` (all images when ``None``) drawn without
    replacement with ``generator``; ``movable`` :math:`m` is a boolean ``(P,)`` mask of the parameters
    that move (all when ``None``). The whole unrolled graph is kept, so the result is differentiable
    with respect to ``images``, ``targets`` and ``lr`` :math:`\alpha`.
    """
    check_count("steps", steps, 20)
    layout = ParameterLayout.of(model)
    mask = None if movable is None else movable.to(start.device, images.dtype)
    batch_size = batch_size or len(images)
    theta = start.detach().clone().requires_grad_(True)
    batches: list[torch.Tensor] = []
    for _ in range(steps):
        if not batches:
            batches = list(torch.randperm(len(images), generator=generator).split(batch_size))
        idx = batches.pop().to(images.device)
        logits = functional_call(model, layout.unflatten(theta), (images[idx],))
        (grad,) = torch.autograd.grad(loss_fn(logits, targets[idx]), theta, create_graph=True)
        theta = theta - lr * (grad if mask is None else grad * mask)
    return theta


def matching_loss(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The normalised parameter-matching loss (MTT eq. 2; LAD's DAM compares only the backbone):

    .. math:: \mathcal L = \frac{\lVert m \odot (\hat\theta_{N} - \theta^*_{s+M})\rVert^2}{\lVert m \odot (\theta^*_s - \theta^*_{s+M})\rVert^2}

    0 when the student lands on the target :math:`\theta^*_{s+M}`, 1 when it does not move from
    :math:`\theta^*_s`. ``mask`` :math:`m` is a boolean ``(P,)`` selection (all entries when ``None``).
    """
    if mask is not None:
        mask = mask.to(student_end.device)
        student_end, start, target = student_end[mask], start[mask], target[mask]
    return (student_end - target).pow(2).sum() / (start - target).pow(2).sum()


@dataclass(frozen=True)
class MatchingPhase:
    r"""One matching phase of an outer iteration, weighted by ``weight`` (LAD's :math:`\lambda`).

    ``trajectories (experts, epochs + 1, P)``; the start epoch :math:`s` is drawn uniformly from
    ``range(*start_epochs)`` and the target is :math:`s + M` with :math:`M` = ``expert_epochs``; the
    student takes ``student_steps`` steps with ``loss_fn``. ``match`` is the part of the parameters
    the loss compares and ``move`` the part the student may change (:data:`PARTS`): DATM is
    ``("all", "all")``, LAD's DAM ``("backbone", "all")`` with a class-weighted loss, LAD's ED
    ``("all", "classifier")`` on stage-2 experts.
    """

    trajectories: torch.Tensor
    weight: float = 1.0
    start_epochs: tuple[int, int] = (0, 10)
    expert_epochs: int = 2
    student_steps: int = 20
    loss_fn: StudentLoss = soft_cross_entropy
    match: str = "all"
    move: str = "all"

    def __post_init__(self) -> None:
        check_choice("match", self.match, PARTS)
        check_choice("move", self.move, PARTS)
        check_count("expert_epochs", self.expert_epochs, 2)
        if self.trajectories.ndim != 3:
            raise ValueError("trajectories must be (experts, epochs + 1, P); "
                             f"got shape {tuple(self.trajectories.shape)}.")
        low, high = self.start_epochs
        available = self.trajectories.shape[1] - 1
        if not 0 <= low < high or high - 1 + self.expert_epochs > available:
            raise ValueError(f"start_epochs={self.start_epochs} with expert_epochs={self.expert_epochs} needs "
                             f"0 <= low < high and high - 1 + expert_epochs <= {available} (the experts' epochs); "
                             f"lower high or expert_epochs, or train longer experts.")


def phase_loss(model: nn.Module, phase: MatchingPhase, synthetic: SyntheticSet, *, batch_size: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of a phase: pick an expert and a start epoch :math:`s` with ``generator``, unroll the student
    from :math:`\\theta^*_s` on ``synthetic`` (:func:`unroll_student`) and return :func:`matching_loss`
    against :math:`\\theta^*_{s+M}` (a differentiable scalar)."""
    expert = int(torch.randint(len(phase.trajectories), (1,), generator=generator))
    s = int(torch.randint(*phase.start_epochs, (1,), generator=generator))
    device = synthetic.images.device
    start, target = (phase.trajectories[expert, e].to(device) for e in (s, s + phase.expert_epochs))
    end = unroll_student(model, start, synthetic.images, synthetic.soft_labels, synthetic.lr,
                         steps=phase.student_steps, loss_fn=phase.loss_fn, batch_size=batch_size,
                         movable=parameter_mask(model, phase.move), generator=generator)
    return matching_loss(end, start, target, parameter_mask(model, phase.match))


def distill(model: nn.Module, synthetic: SyntheticSet, phases: list[MatchingPhase], *, iterations: int,
            image_lr: float = 100.0, label_lr: float = 2.0, lr_lr: float = 1e-5, batch_size: int | None = None,
            seed: int = 0) -> list[float]:
    r"""Tune ``synthetic`` in place for ``iterations`` outer steps of trajectory matching.

    Each step minimises :math:`\sum_k \lambda_k \mathcal L_k` over the ``phases`` (:func:`phase_loss`)
    with SGD on the images (lr ``image_lr``, momentum 0.5), the soft labels (``label_lr``, momentum
    0.9) and the student learning rate (``lr_lr``, momentum 0.5): DATM's and LAD's optimisers, whose
    defaults are LAD's CIFAR-10 values. Returns the total loss of each step.
    """
    check_count("iterations", iterations, 100)
    if not phases:
        raise ValueError("phases is empty; pass at least one MatchingPhase.")
    optimizers = [torch.optim.SGD([synthetic.images], lr=image_lr, momentum=0.5),
                  torch.optim.SGD([synthetic.soft_labels], lr=label_lr, momentum=0.9),
                  torch.optim.SGD([synthetic.lr], lr=lr_lr, momentum=0.5)]
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(iterations):
        total = sum(p.weight * phase_loss(model, p, synthetic, batch_size=batch_size, generator=gen) for p in phases)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in optimizers:
            opt.step()
        losses.append(float(total.detach()))
    return losses


# ----------------------------------------------------------------------------- evaluation
def train_on_synthetic(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epochs: int, lr: float,
                       batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 5e-4,
                       seed: int = 0) -> nn.Module:
    """Train ``model`` on a distilled set with SGD (:func:`effnb.train.fit`): soft cross-entropy when
    ``targets`` are soft-label logits ``(n, classes)``, plain cross-entropy when they are class indices
    ``(n,)`` (a real subset). Returns ``model``."""
    images, targets = images.detach(), targets.detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=momentum, weight_decay=weight_decay)
    if targets.dtype == torch.long:
        fit(model, images, targets, epochs=epochs, batch_size=batch_size, optimizer=optimizer, seed=seed,
            progress=False)
    else:  # fit passes the soft labels as probabilities in [0, 1]; their logs are valid logits again
        fit(model, images, F.softmax(targets, dim=1), epochs=epochs, batch_size=batch_size, optimizer=optimizer,
            seed=seed, progress=False, loss_fn=lambda logits, probs: soft_cross_entropy(logits, probs.log()))
    return model


def evaluate_synthetic(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, test: Split, *,
                       epochs: int = 300, lr: float = 0.01, batch_size: int = 256, seed: int = 0) -> Accuracy:
    """Train a fresh ``model`` on ``(images, targets)`` (:func:`train_on_synthetic`) and return its overall and
    per-class accuracy on ``test``'s (balanced) test set (:func:`effnb.train.evaluate`)."""
    train_on_synthetic(model, images, targets, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return evaluate(model, test.x_test, test.y_test, test.num_classes)


def head_tail_accuracy(per_class: torch.Tensor, train_counts: torch.Tensor) -> tuple[float, float]:
    """Mean accuracy of the head (the most frequent half of the classes in the training set) and of the
    tail (the rarest half); with an odd number of classes the middle one counts in neither."""
    order = torch.argsort(train_counts, descending=True, stable=True)
    half = len(order) // 2
    return float(per_class[order[:half]].mean()), float(per_class[order[-half:]].mean())

