"""Choosing which training samples to keep: GraphCut selection, dataset-quantization bins, per-class
budgets, and the budget reallocation of DQAS.

Every function works on tensors of indices into one class's (or one data set's) samples, so the
notebook decides what the samples and the embeddings are. Introduced in Chapter 3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["allocate_budget", "bin_order", "class_quotas", "gradient_embeddings", "graphcut_order",
           "graphcut_value", "quantization_bins", "similarity"]


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


def quantization_bins(sim: torch.Tensor, num_bins: int = 10, lam: float = 1.0) -> list[torch.Tensor]:
    """Dataset Quantization's bins: split the ``n`` samples into ``num_bins`` near-equal bins, each the
    GraphCut selection (:func:`graphcut_order`) from what the earlier bins left.

    Bin ``b`` is chosen with the remaining samples as its ground set ``V``. Returns a list of
    ``num_bins`` index tensors into ``sim``'s rows that together hold every sample once; sizes differ
    by at most one, the larger bins first.
    """
    _check_square(sim)
    n = sim.shape[0]
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= n:
        raise ValueError(f"num_bins={num_bins!r} must be an int between 1 and the {n} samples to split.")
    sizes = [n // num_bins + (1 if b < n % num_bins else 0) for b in range(num_bins)]
    remaining = torch.arange(n, device=sim.device)
    bins = []
    for size in sizes:
        picked = graphcut_order(sim[remaining][:, remaining], size, lam)
        bins.append(remaining[picked])
        keep = torch.ones(len(remaining), dtype=torch.bool, device=sim.device)
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
        raise ValueError("bins is empty: pass the list that quantization_bins returns.")
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


def gradient_embeddings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    r"""Last-layer gradient embedding of every sample: :math:`[\,g \,;\, g \otimes h\,]`, with
    :math:`g = \partial L/\partial z = \mathrm{softmax}(z) - \mathrm{onehot}(y)` and ``h`` the penultimate features.

    ``g ⊗ h`` is the gradient of the cross-entropy with respect to the head's weight matrix, ``g``
    with respect to its bias. ``model`` needs ``features(x)`` and a linear ``head``, like
    :class:`effnb.models.SmallCNN` and :class:`effnb.models.MLP`. Returns ``(N, C + C·D)`` on the CPU.
    """
    if not hasattr(model, "features") or not isinstance(getattr(model, "head", None), nn.Linear):
        raise TypeError(f"{type(model).__name__} needs a features(x) method and a linear head, like "
                        "effnb.models.SmallCNN or effnb.models.MLP.")
    device = next(model.parameters()).device
    model.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = model.features(x[i : i + batch_size].to(device))
            z = model.head(h)
            g = z.softmax(1) - F.one_hot(y[i : i + batch_size].to(device), z.shape[1]).float()
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
