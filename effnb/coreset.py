"""Choosing which training samples to keep: GraphCut selection, dataset-quantization bins, per-class
budgets, and the budget reallocation of DQAS.

Every function works on tensors of indices into one class's (or one data set's) samples, so the
notebook decides what the samples and the embeddings are. Introduced in Chapter 3.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["allocate_budget", "bin_order", "class_quotas", "gradient_embeddings", "graphcut_order",
           "graphcut_value", "dq_bin_sizes", "quantization_bins", "similarity"]


def _check_square(sim: torch.Tensor) -> None:
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (n, n) similarity matrix, got shape {tuple(sim.shape)}.")


def similarity(embeddings: torch.Tensor) -> torch.Tensor:
    r"""Pairwise similarity :math:`s_{ij} = \tfrac12 + \tfrac12\cos(e_i, e_j)` in [0, 1] of ``(n, d)`` rows.

    The shift to [0, 1] is what Dataset Quantization's GraphCut uses; a zero row gets similarity 1/2
    to everything. Returns ``(n, n)`` in the embeddings' floating dtype.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), one row per sample; got shape {tuple(embeddings.shape)}.")
    unit = F.normalize(embeddings if embeddings.is_floating_point() else embeddings.float(), dim=1)
    return 0.5 + 0.5 * unit @ unit.T


def graphcut_value(sim: torch.Tensor, selected: torch.Tensor, lam: float = 1.0) -> float:
    r"""The GraphCut function :math:`f(S) = \lambda \sum_{i \in V}\sum_{j \in S} s_{ij} - \sum_{i \in S}\sum_{j \in S} s_{ij}`.

    ``V`` is every row of ``sim``; ``selected`` holds the indices of ``S``. The first term rewards
    samples that represent the whole set, the second penalises samples that resemble each other.
    """
    _check_square(sim)
    selected = torch.as_tensor(selected, dtype=torch.long)
    return float(lam * sim[:, selected].sum() - sim[selected][:, selected].sum())


def graphcut_order(sim: torch.Tensor, k: int, lam: float = 1.0) -> torch.Tensor:
    r"""Greedily pick ``k`` of the ``n`` samples that maximise :func:`graphcut_value`, in pick order.

    Each step takes the sample with the largest gain
    :math:`g(x) = \lambda \sum_{i \in V} s_{ix} - 2 \sum_{j \in S} s_{jx}` over all unpicked samples at
    once; the gain is updated by subtracting ``2 s[new]`` after each pick. (The exact marginal gain
    :math:`f(S \cup \{x\}) - f(S)` also subtracts :math:`s_{xx}`, which is 1 for every sample and
    does not change the choice.) Ties go to the lowest index. Returns a ``(k,)`` long tensor.
    """
    _check_square(sim)
    n = sim.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k={k!r} must be an int between 0 and the {n} samples available.")
    gain = lam * sim.sum(0)
    taken = torch.zeros(n, dtype=torch.bool, device=sim.device)
    order = torch.empty(k, dtype=torch.long, device=sim.device)
    for step in range(k):
        best = int(torch.where(taken, float("-inf"), gain).argmax())
        order[step] = best
        taken[best] = True
        gain = gain - 2 * sim[best]
    return order


def dq_bin_sizes(class_sizes: list[int] | torch.Tensor, num_bins: int = 10) -> torch.Tensor:
    """How many samples of each class each of Dataset Quantization's bins holds, as DQ's code decides it.

    DQ's ``quantize_sample.py`` sets one bin's size to ``round(N / num_bins)`` of the ``N`` samples;
    bin ``b`` then takes the fraction ``f_b`` = that size / the samples still left, and from each class
    ``round(f_b · left_c)`` of the ``left_c`` it has left (Python's rounding, halves to even); the last
    bin is everything left. So bins are proportional to the classes, and where the rounding overshoots,
    the last bin is smaller than the others. Returns a ``(num_bins, C)`` long tensor whose columns sum to the
    class sizes. Raises ``ValueError`` where a bin would get no sample of some class (too many bins).
    """
    sizes = [int(n) for n in torch.as_tensor(class_sizes).tolist()]
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins={num_bins!r} must be a whole number >= 1, e.g. num_bins = 10.")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"class_sizes={sizes} must hold at least one sample per class.")
    bin_size = round(sum(sizes) * (1 / num_bins))
    left, table = list(sizes), []
    for _ in range(num_bins - 1):
        fraction = bin_size / sum(left)
        take = [round(fraction * n) for n in left]
        table.append(take)
        left = [n - t for n, t in zip(left, take)]
    table.append(left)
    table = torch.tensor(table, dtype=torch.long)
    if (table < 1).any():
        raise ValueError(f"{num_bins} bins leave some bin without a sample of a class of {min(sizes)}; "
                         "use fewer bins (num_bins <= the smallest class size).")
    return table


def quantization_bins(embed: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, sizes: torch.Tensor,
                      lam: float = 1.0) -> list[list[torch.Tensor]]:
    """Dataset Quantization's bins, built as its code builds them: one GraphCut selection per bin and
    class, each from what the earlier bins left, in an embedding recomputed for every bin.

    For bin ``b``, ``embed(remaining)`` returns one row per remaining sample (``remaining`` holds their
    indices into ``labels``; DQ trains a fresh selection network on exactly those samples and returns
    their gradient embeddings); then class ``c`` gives the ``sizes[b, c]`` samples that
    :func:`graphcut_order` picks first among its remaining ones, with its remaining samples as the
    ground set. The last bin takes what is left without a selection (``embed`` is called
    ``num_bins - 1`` times). ``sizes`` is ``(num_bins, C)``, e.g. from :func:`dq_bin_sizes`.
    Returns ``bins[c][b]``: the indices of class ``c``'s samples in bin ``b``, in pick order.
    """
    labels = torch.as_tensor(labels).cpu()
    sizes = torch.as_tensor(sizes, dtype=torch.long)
    counts = torch.bincount(labels, minlength=sizes.shape[-1] if sizes.ndim == 2 else 0)
    if sizes.ndim != 2 or sizes.shape[1] != len(counts) or not torch.equal(sizes.sum(0), counts):
        raise ValueError(f"sizes must be (num_bins, C) with each class's column summing to its {counts.tolist()} "
                         "samples; build it with dq_bin_sizes(class sizes, num_bins).")
    remaining = torch.arange(len(labels))
    bins: list[list[torch.Tensor]] = [[] for _ in range(len(counts))]
    for b in range(sizes.shape[0]):
        if b == sizes.shape[0] - 1:
            for c in range(len(counts)):
                bins[c].append(remaining[labels[remaining] == c])
            break
        rows = embed(remaining)
        if rows.shape[0] != len(remaining):
            raise ValueError(f"embed returned {rows.shape[0]} rows for {len(remaining)} remaining samples.")
        keep = torch.ones(len(remaining), dtype=torch.bool)
        for c in range(len(counts)):
            where = (labels[remaining] == c).nonzero().flatten()
            picked = where[graphcut_order(similarity(rows[where].cpu()), int(sizes[b, c]), lam).cpu()]
            bins[c].append(remaining[picked])
            keep[picked] = False
        remaining = remaining[keep]
    return bins


def bin_order(bins: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """The order in which uniform sampling from ``bins`` draws samples, so that any prefix is uniform.

    Each bin is shuffled; the bins are visited in a random order, one sample from each per round,
    until all are empty. Taking the first ``m`` of the result samples every bin as evenly as ``m``
    allows (counts differ by at most one), and a larger budget keeps the smaller budget's samples.
    """
    if not bins:
        raise ValueError("bins is empty: pass one class's list of bins, e.g. quantization_bins(...)[c].")
    shuffled = [b[torch.randperm(len(b), generator=generator).to(b.device)] for b in bins]
    visit = torch.randperm(len(bins), generator=generator).tolist()
    longest = max(len(b) for b in bins)
    return torch.cat([shuffled[b][r : r + 1] for r in range(longest) for b in visit])


def class_quotas(total: int, class_sizes: list[int] | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Split a budget of ``total`` samples as evenly as possible over the classes, capped at each class's size.

    Every class gets ``total // C``; the remainder goes one each to classes drawn at random; a class
    that has fewer samples than its share passes the rest to the others. Returns ``(C,)`` long counts
    that sum to ``total``. Raises ``ValueError`` if ``total`` exceeds the samples there are.
    """
    sizes = torch.as_tensor(class_sizes, dtype=torch.long)
    if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= int(sizes.sum()):
        raise ValueError(f"total={total!r} must be an int between 0 and the {int(sizes.sum())} samples there are.")
    quota = torch.zeros_like(sizes)
    left = total
    while left > 0:
        open_ = (quota < sizes).nonzero().flatten()
        share, extra = divmod(left, len(open_))
        add = torch.full((len(open_),), share, dtype=torch.long)
        add[torch.randperm(len(open_), generator=generator)[:extra]] += 1
        add = torch.minimum(add, sizes[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    return quota


def gradient_embeddings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                        loss_on: str = "probabilities") -> torch.Tensor:
    r"""Last-layer gradient embedding of every sample: :math:`[\,g \,;\, g \otimes h\,]`, with
    :math:`g = \partial L/\partial z` at the logits ``z`` and ``h`` the penultimate features.

    ``g ⊗ h`` is the gradient of the loss with respect to the head's weight matrix, ``g`` with respect
    to its bias. Which loss:

    - ``loss_on="probabilities"`` (DQ's code, through DeepCore): the cross-entropy applied to the
      softmax *outputs* :math:`p = \mathrm{softmax}(z)`, so the loss takes a second softmax, and
      :math:`g = (\mathrm{diag}(p) - p p^\top)(\mathrm{softmax}(p) - \mathrm{onehot}(y))`;
    - ``loss_on="logits"`` (BADGE): the usual cross-entropy of the logits,
      :math:`g = \mathrm{softmax}(z) - \mathrm{onehot}(y)`.

    DeepCore averages the loss over its batch, so its rows carry a factor 1/B more; cosine similarity, all
    that GraphCut reads, does not see it. ``model`` needs ``features(x)`` and a linear ``head``, like
    :class:`effnb.models.SmallCNN` and :class:`effnb.models.MLP`. Returns ``(N, C + C·D)`` on the CPU.
    """
    if not hasattr(model, "features") or not isinstance(getattr(model, "head", None), nn.Linear):
        raise TypeError(f"{type(model).__name__} needs a features(x) method and a linear head, like "
                        "effnb.models.SmallCNN or effnb.models.MLP.")
    if loss_on not in ("probabilities", "logits"):
        raise ValueError(f"loss_on={loss_on!r} must be 'probabilities' (DQ's code) or 'logits' (BADGE).")
    device = next(model.parameters()).device
    model.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = model.features(x[i : i + batch_size].to(device))
            p = model.head(h).softmax(1)
            onehot = F.one_hot(y[i : i + batch_size].to(device), p.shape[1]).float()
            if loss_on == "logits":
                g = p - onehot
            else:
                v = p.softmax(1) - onehot                                   # dL/dp for L = CE(softmax(p))
                g = p * v - p * (p * v).sum(1, keepdim=True)                # (diag(p) - p p^T) v
            rows.append(torch.cat([g, (g[:, :, None] * h[:, None, :]).flatten(1)], 1).cpu())
    return torch.cat(rows)


def allocate_budget(errors: torch.Tensor, counts: torch.Tensor, total: int, caps: torch.Tensor,
                    alpha: float = 0.5, minimum: int = 1) -> torch.Tensor:
    r"""Per-class budgets that minimise the predicted total error :math:`\sum_c \hat e_c(n_c)` at a fixed total.

    Each class's error is extrapolated from where it was measured by a power law,
    :math:`\hat e_c(n) = e_c\,(m_c / n)^{\alpha}` (``errors`` :math:`e_c` measured with ``counts``
    :math:`m_c` samples). Since each :math:`\hat e_c` is convex and decreasing, giving the samples one at
    a time to the class with the largest drop :math:`\hat e_c(n) - \hat e_c(n+1)` is optimal; that is
    the same as keeping the largest ``total - C·minimum`` drops over all classes at once, which is what
    this computes. Each class gets between ``minimum`` and ``caps[c]``. Returns ``(C,)`` long budgets.
    """
    errors, counts, caps = (torch.as_tensor(t, dtype=torch.float64) for t in (errors, counts, caps))
    if not (errors.shape == counts.shape == caps.shape and errors.ndim == 1):
        raise ValueError("errors, counts and caps must be 1-D with one entry per class.")
    if (counts < 1).any() or (errors < 0).any():
        raise ValueError("counts must be >= 1 and errors >= 0 (measure each class with at least one sample).")
    if (caps < minimum).any() or not minimum * len(caps) <= total <= int(caps.sum()):
        raise ValueError(f"total={total} cannot give every class between minimum={minimum} and its cap "
                         f"(caps sum to {int(caps.sum())}); lower minimum or choose another total.")
    n = torch.arange(minimum, int(caps.max()) + 1, dtype=torch.float64)          # sizes a class can grow from
    predicted = lambda size: errors[:, None] * (counts[:, None] / size) ** alpha   # noqa: E731
    drops = predicted(n[None, :]) - predicted(n[None, :] + 1)                      # (C, sizes): drop of one more
    drops = torch.where(n[None, :] < caps[:, None], drops, float("-inf"))          # no growing past the cap
    extra = total - minimum * len(caps)
    chosen = drops.flatten().topk(extra).indices // drops.shape[1]
    return minimum + torch.bincount(chosen, minlength=len(caps)).long()
