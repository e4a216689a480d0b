"""One training loop for the whole book, per-class accuracy, dense-prediction metrics, and
safetensors checkpoints.

Introduced in Chapter 0; the dense-prediction metrics in Chapter 7.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effnb.config import check_count, data_dir, progress_bar
from effnb.data import DenseScenes, atomic_path, check_sha256, read_sha256sums, sha256_of, write_sha256sums

__all__ = ["Accuracy", "CHECKPOINT_DIR", "DENSE_METRICS", "DenseMetrics", "History", "LOADED_LISTED", "checkpoint_fix", "delta_m",
           "dense_metrics", "evaluate", "fit", "load_checkpoint", "read_checkpoint_metadata", "read_listed_checkpoint",
           "save_checkpoint", "save_listed_checkpoint"]

MANIFEST = "SHA256SUMS"  # the sha256 list beside the repository's checkpoints (``sha256sum -c`` format)


CHECKPOINT_DIR = data_dir("checkpoints")  # the book's reference checkpoints and their SHA256SUMS
# Every SHA256SUMS-listed checkpoint this process has read after checking it, in order: how a test tells a
# chapter that loaded its reference model from one that trained its own (make test runs the chapters that
# load one from the wheel and checks this list at the end).
LOADED_LISTED: list[Path] = []


def checkpoint_fix(script: str) -> str:
    """What a reader can do about a missing or changed reference checkpoint: in a clone of the repository,
    re-create it with ``script``; where effnb came from its wheel (which carries the checkpoints), reinstall it."""
    if CHECKPOINT_DIR.parent.name == "data":
        return f"re-create it with `{script}`"
    return (f"reinstall effnb, whose wheel carries it (`pip uninstall -y effnb`, then run the chapter's first cell "
            f"again), or re-create it with `{script}` in a clone of the repository")


@dataclass
class History:
    """Mean training loss of each epoch, ``losses[e]`` for epoch ``e`` (the same field name as
    :class:`effnb.diffusion.TrainHistory`, which keeps one loss per step)."""

    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Accuracy:
    """Overall accuracy and accuracy per class ``(num_classes,)``, both in [0, 1]."""

    overall: float
    per_class: torch.Tensor

    @property
    def balanced(self) -> float:
        """Mean of the per-class accuracies (what a long-tailed chapter reports)."""
        return float(self.per_class.mean())


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    loss_fn: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> History:
    """Train ``model`` on tensors ``x (N, ...)`` and ``y (N,)`` for ``epochs`` with shuffled mini-batches.

    Adam with ``lr``/``weight_decay`` unless ``optimizer`` is given; cross-entropy unless ``loss_fn``
    is. Batches move to the model's device. The shuffle order depends only on ``seed``. ``progress=False``
    hides the progress bar (for a chapter that trains many small models under one bar of its own).
    Returns a :class:`History`. Introduced in Chapter 0.
    """
    check_count("epochs", epochs, 3)
    check_count("batch_size", batch_size, 64)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}; they must match.")
    top_label = int(y.max()) if len(y) else 0
    device = _device_of(model)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = History()
    model.train()
    for _ in progress_bar(range(epochs), desc, enabled=progress):
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            logits = model(xb)
            if start == 0 and logits.ndim == 2 and logits.shape[1] <= top_label:
                raise ValueError(f"y holds the label {top_label} but the model gives {logits.shape[1]} class "
                                 f"scores; build it with num_classes={top_label + 1} or more.")
            loss = loss_fn(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.losses.append(total / count)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
             batch_size: int = 512) -> Accuracy:
    """Accuracy of ``model`` on ``x (N, ...)``, ``y (N,)``: overall and per class.

    ``num_classes`` defaults to the largest label + 1; a class absent from ``y`` gets accuracy NaN.
    Raises ``ValueError`` for ``batch_size`` < 1 or a ``num_classes`` below a label in ``y``.
    Introduced in Chapter 0.
    """
    check_count("batch_size", batch_size, 512)
    y = y.cpu()  # predictions come back to the CPU; labels may live on the model's device
    top_label = int(y.max()) if len(y) else 0
    if num_classes is None:
        num_classes = top_label + 1
    elif num_classes <= top_label:
        raise ValueError(f"num_classes={num_classes} is too small: y holds the label {top_label}; "
                         f"pass num_classes={top_label + 1} or more (or None).")
    device = _device_of(model)
    model.eval()
    preds = torch.cat([model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    correct = (preds == y).to(torch.float64)  # counts divided in float64: 135 / 150 >= 0.9 holds exactly
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, correct)
    totals = torch.bincount(y, minlength=num_classes).to(torch.float64)
    per_class = torch.where(totals > 0, hits / totals.clamp(min=1), torch.full_like(totals, float("nan")))
    return Accuracy(overall=int(correct.sum()) / max(len(y), 1), per_class=per_class)


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Save ``model``'s state dict with safetensors; ``metadata`` (JSON-serialisable) travels in the header.

    The file is written to a temporary name, read back, and only then renamed over ``path``
    (:func:`effnb.data.atomic_path`), so an interrupted save keeps the previous checkpoint.
    Returns ``path``. Introduced in Chapter 0.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"effnb": json.dumps(metadata or {})})
        read_checkpoint_metadata(tmp)  # verify before the rename: the header parses
    return path


def read_checkpoint_metadata(path: str | Path) -> dict:
    """The metadata a :func:`save_checkpoint` file carries, without loading its tensors.

    Lets a caller rebuild the right model (from a stored config) before loading the weights.
    Raises ``FileNotFoundError`` naming the path when it is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; create it first (see the chapter or scripts/).")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta.get("effnb", "{}"))


def load_checkpoint(model: nn.Module, path: str | Path, sha256: str | None = None) -> dict:
    """Load a :func:`save_checkpoint` file into ``model`` (strictly) and return its metadata.

    With ``sha256`` (hex) the file is checked first, so a changed byte raises ``ValueError``
    instead of loading silently (safetensors itself only checks the header). Raises
    ``FileNotFoundError`` naming the path when it is missing. Introduced in Chapter 0.
    """
    metadata = read_checkpoint_metadata(path)
    if sha256 is not None:
        check_sha256(path, sha256, "save it again, or pass the sha256 of the file you meant")
    model.load_state_dict(load_file(str(path), device=str(_device_of(model))))
    return metadata


def save_listed_checkpoint(model: nn.Module, path: str | Path, metadata: dict) -> str:
    """Save ``model`` with :func:`save_checkpoint` and record its sha256 in ``SHA256SUMS`` beside it;
    return the sha256. The book's reference checkpoints (Chapters 2, 5, 6, 9) are written this way.

    Crash-safe: the weights are written and hashed under a temporary name first; then the list loses
    the file's old entry, the weights are renamed into place, and the list gains the new entry, each
    step an atomic ``os.replace``. An interrupt therefore leaves either the old checkpoint, readable,
    or a missing entry (whose error names the fix), never weights that disagree with their entry.
    """
    path = Path(path)
    manifest = path.parent / MANIFEST
    with atomic_path(path) as tmp:
        save_checkpoint(model, tmp, metadata)
        digest = sha256_of(tmp)
        digests = read_sha256sums(manifest)
        if path.name in digests:                    # 1. drop the old entry
            write_sha256sums(manifest, {n: d for n, d in digests.items() if n != path.name})
    # 2. the new weights are in place (atomic_path renamed them); 3. record them
    write_sha256sums(manifest, read_sha256sums(manifest) | {path.name: digest})
    return digest


def read_listed_checkpoint(path: str | Path, fix: str, label: str) -> dict:
    """Check a :func:`save_listed_checkpoint` file against its ``SHA256SUMS`` entry and return its metadata.

    A missing file or entry raises ``FileNotFoundError``, a changed byte ``ValueError``; both messages
    start with ``label`` (e.g. "Checkpoint data/checkpoints/x.safetensors") and end with ``fix``
    (e.g. "re-create it with `python scripts/...`"). Load the weights afterwards with
    :func:`load_checkpoint` into the model the metadata describes. A checked file is appended to
    :data:`LOADED_LISTED`.
    """
    path = Path(path)
    expected = read_sha256sums(path.parent / MANIFEST).get(path.name)
    if not path.exists() or expected is None:
        raise FileNotFoundError(f"{label} or its sha256 entry is missing; {fix}.")
    check_sha256(path, expected, fix, label=label)
    LOADED_LISTED.append(path.resolve())
    return read_checkpoint_metadata(path)


# ----------------------------------------------------------------------------- dense prediction (Chapter 7)
# Each metric of a multi-task dense predictor, and whether a larger value is better.
DENSE_METRICS: dict[str, bool] = {"miou": True, "depth_rmse": False, "normal_angle": False, "boundary_f": True}


@dataclass(frozen=True)
class DenseMetrics:
    """One model's four dense-prediction metrics on a test set (:func:`dense_metrics`).

    ``miou`` in [0, 1] (higher is better), ``depth_rmse`` in depth units (lower), ``normal_angle``
    the mean angle error in degrees (lower), ``boundary_f`` in [0, 1] (higher). Introduced in Chapter 7.
    """

    miou: float
    depth_rmse: float
    normal_angle: float
    boundary_f: float

    def as_dict(self) -> dict[str, float]:
        """The metrics by name, in the order of :data:`DENSE_METRICS`."""
        return {name: getattr(self, name) for name in DENSE_METRICS}

    def __str__(self) -> str:
        return (f"mIoU {self.miou:.3f}, depth RMSE {self.depth_rmse:.3f}, normal angle {self.normal_angle:.1f} deg, "
                f"boundary F {self.boundary_f:.3f}")


def _check_maps(name: str, pred: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(pred.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(pred.shape)}; the targets need {shape}.")


@torch.no_grad()
def dense_metrics(segmentation: torch.Tensor, depth: torch.Tensor, normals: torch.Tensor, boundaries: torch.Tensor,
                  target: DenseScenes) -> DenseMetrics:
    r"""Score dense predictions against ``target`` (:class:`effnb.data.DenseScenes`), pooled over all its pixels.

    Inputs are the raw network outputs: ``segmentation`` class scores ``(N, K, H, W)``, ``depth``
    ``(N, 1, H, W)``, ``normals`` ``(N, 3, H, W)`` (any length; normalised here) and ``boundaries``
    logits ``(N, 1, H, W)``.

    - mIoU: :math:`\frac{1}{K'}\sum_c \frac{|P_c \cap T_c|}{|P_c \cup T_c|}` over the K' classes that
      occur in the prediction or the target; pixels labelled ``ignore_index`` are left out.
    - depth RMSE :math:`\sqrt{\mathrm{mean}(\hat d - d)^2}` over pixels with depth > 0 (0 = missing).
    - normals: mean of :math:`\arccos(\hat n \cdot n)` in degrees over pixels with a known normal.
    - boundary F: :math:`2PR/(P + R)` of the pixels with logit > 0 against the boundary pixels, exact
      pixel match (the papers' ODS F allows a small distance tolerance; ours is stricter).

    Returns :class:`DenseMetrics`. Introduced in Chapter 7.
    """
    n, _, h, w = target.images.shape
    if segmentation.dim() != 4 or segmentation.shape[0] != n or segmentation.shape[2:] != (h, w):
        raise ValueError(f"segmentation has shape {tuple(segmentation.shape)}; the targets need (N, K, H, W) "
                         f"with N, H, W = {n}, {h}, {w}.")
    _check_maps("depth", depth, (n, 1, h, w))
    _check_maps("normals", normals, (n, 3, h, w))
    _check_maps("boundaries", boundaries, (n, 1, h, w))
    segmentation, depth, normals, boundaries = (t.detach().float().cpu() for t in (segmentation, depth, normals,
                                                                                  boundaries))
    labelled = target.segmentation != target.ignore_index
    pred, true = segmentation.argmax(1)[labelled], target.segmentation[labelled]
    k = max(segmentation.shape[1], target.num_classes)
    inter = torch.bincount(true[pred == true], minlength=k).float()
    union = torch.bincount(pred, minlength=k).float() + torch.bincount(true, minlength=k).float() - inter
    miou = float((inter[union > 0] / union[union > 0]).mean())
    valid = target.depth > 0
    rmse = float(((depth - target.depth)[valid] ** 2).mean().sqrt())
    known = target.normals.norm(dim=1) > 0.5
    cos = (torch.nn.functional.normalize(normals, dim=1) * target.normals).sum(1).clamp(-1, 1)
    angle = float(torch.rad2deg(torch.acos(cos[known])).mean())
    hit, edge = boundaries > 0, target.boundaries > 0.5
    both = float((hit & edge).sum())
    precision, recall = both / max(float(hit.sum()), 1.0), both / max(float(edge.sum()), 1.0)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return DenseMetrics(miou, rmse, angle, f)


def delta_m(metrics: DenseMetrics, reference: DenseMetrics) -> float:
    r"""The multi-task performance change of ``metrics`` against ``reference``, in percent
    (Maninis et al. 2019; Vandenhende et al. 2021):

    .. math:: \Delta_m = \frac{100}{T} \sum_t (-1)^{l_t} \frac{M_t - M_{b,t}}{M_{b,t}}

    with :math:`l_t = 1` when a lower :math:`M_t` is better (depth RMSE, normal angle), so a positive
    :math:`\Delta_m` means better on average. Introduced in Chapter 7.
    """
    change = []
    for name, higher_better in DENSE_METRICS.items():
        m, b = getattr(metrics, name), getattr(reference, name)
        if b == 0:
            raise ValueError(f"the reference's {name} is 0, so a relative change is undefined; pick another reference.")
        change.append((m - b) / b if higher_better else -(m - b) / b)
    return 100 * sum(change) / len(change)
