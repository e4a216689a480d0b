"""effnb.coreset: GraphCut, dataset-quantization bins, per-class quotas and the DQAS budget rule."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from effnb import coreset as C
from effnb.models import MLP, SmallCNN
from effnb.train import fit


def random_sim(n, seed=0, d=5):
    gen = torch.Generator().manual_seed(seed)
    return C.similarity(torch.randn(n, d, generator=gen, dtype=torch.float64))


def brute_force_greedy(sim, k, lam):
    """Greedy by evaluating f(S + x) - f(S) for every candidate from the value function itself."""
    chosen = []
    for _ in range(k):
        base = C.graphcut_value(sim, torch.tensor(chosen, dtype=torch.long), lam)
        gains = {x: C.graphcut_value(sim, torch.tensor(chosen + [x]), lam) - base
                 for x in range(sim.shape[0]) if x not in chosen}
        chosen.append(max(gains, key=lambda x: (gains[x], -x)))
    return chosen


def test_similarity_lies_in_zero_one_with_ones_on_the_diagonal():
    sim = random_sim(7)
    assert sim.shape == (7, 7) and torch.allclose(sim, sim.T)
    assert float(sim.min()) >= 0 and float(sim.max()) <= 1 + 1e-12
    assert torch.allclose(sim.diagonal(), torch.ones(7, dtype=sim.dtype))
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(C.similarity(e), torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]]))


@pytest.mark.parametrize("seed,n,lam", [(0, 6, 1.0), (1, 7, 1.0), (2, 8, 2.0), (3, 5, 0.5)])
def test_graphcut_order_matches_a_brute_force_greedy(seed, n, lam):
    sim = random_sim(n, seed)
    assert C.graphcut_order(sim, n, lam).tolist() == brute_force_greedy(sim, n, lam)


def test_graphcut_gain_identity():
    """f(S + x) - f(S) = lam * sum_i s_ix - 2 * sum_{j in S} s_jx - s_xx for every S and x outside it."""
    sim, lam = random_sim(6, 4), 1.0
    for size in range(0, 5):
        for subset in itertools.combinations(range(6), size):
            s = torch.tensor(subset, dtype=torch.long)
            for x in set(range(6)) - set(subset):
                lhs = C.graphcut_value(sim, torch.tensor(subset + (x,)), lam) - C.graphcut_value(sim, s, lam)
                rhs = lam * sim[:, x].sum() - 2 * sim[s, x].sum() - sim[x, x]
                assert lhs == pytest.approx(float(rhs), abs=1e-9)


def test_graphcut_prefers_representative_then_diverse_samples():
    # two opposite tight clusters of 8 and 2 (similarity ~1 within, ~0 across): a big-cluster sample gains
    # 8 - 2j after j picks from its cluster, a small-cluster one 2, so GraphCut (lambda = 1) takes three
    # from the big cluster, then turns to the small one
    noise = 0.01 * torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    e = torch.tensor([[1.0, 0.0]] * 8 + [[-1.0, 0.0]] * 2) + noise
    order = C.graphcut_order(C.similarity(e), 5).tolist()
    assert all(i < 8 for i in order[:3]) and any(i >= 8 for i in order[3:5])


def test_graphcut_order_rejects_a_k_larger_than_the_set():
    with pytest.raises(ValueError, match="k=9 must be an int between 0 and the 8 samples"):
        C.graphcut_order(random_sim(8), 9)
    with pytest.raises(ValueError, match="square"):
        C.graphcut_order(torch.zeros(3, 4), 1)


def official_bin_sizes(class_sizes, num_bins):
    """DQ's quantize_sample.py, its sizes only: a fresh fraction of what is left per bin, rounded per class."""
    avail = [(c, i) for c, n in enumerate(class_sizes) for i in range(n)]
    coreset_size = round(len(avail) * (1 / num_bins))
    rows = []
    for exp in range(num_bins - 1):
        fraction = coreset_size / len(avail)
        take = [round(fraction * sum(1 for a in avail if a[0] == c)) for c in range(len(class_sizes))]
        rows.append(take)
        for c, t in enumerate(take):          # drop the first t of class c (which ones does not matter here)
            drop = [a for a in avail if a[0] == c][:t]
            avail = [a for a in avail if a not in drop]
    rows.append([sum(1 for a in avail if a[0] == c) for c in range(len(class_sizes))])
    return rows


@pytest.mark.parametrize("class_sizes,num_bins", [([135, 134, 136, 133], 10), ([13, 7, 25], 3), ([40, 41], 7)])
def test_dq_bin_sizes_follow_dq_code(class_sizes, num_bins):
    sizes = C.dq_bin_sizes(class_sizes, num_bins)
    assert sizes.tolist() == official_bin_sizes(class_sizes, num_bins)
    assert sizes.sum(0).tolist() == class_sizes and sizes.shape == (num_bins, len(class_sizes))


def test_dq_bin_sizes_round_halves_to_even_as_python_does():
    # 4 bins of 10 from classes of 10 and 30: the first takes 0.25 of each, 2.5 -> 2 and 7.5 -> 8 (not 3 and 8)
    assert C.dq_bin_sizes([10, 30], 4).tolist() == [[2, 8], [3, 7], [2, 8], [3, 7]]
    # 10 bins of 2 from classes of 5 and 15: 0.5 -> 0, so the first bin would hold no sample of class 0
    with pytest.raises(ValueError, match="use fewer bins"):
        C.dq_bin_sizes([5, 15], 10)
    with pytest.raises(ValueError, match="num_bins=0 must be a whole number"):
        C.dq_bin_sizes([5, 15], 0)


def test_quantization_bins_partition_each_class_and_reembed_for_every_bin():
    gen = torch.Generator().manual_seed(5)
    labels = torch.tensor([0] * 23 + [1] * 17)[torch.randperm(40, generator=gen)]
    table = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    calls = []

    def embed(remaining):                     # a fixed embedding, re-read for the remaining samples only
        calls.append(remaining.clone())
        return table[remaining]

    sizes = C.dq_bin_sizes([23, 17], 5)
    bins = C.quantization_bins(embed, labels, sizes)
    assert len(calls) == 4 and len(calls[0]) == 40 and torch.equal(calls[1], torch.tensor(sorted(
        set(range(40)) - set(torch.cat([bins[0][0], bins[1][0]]).tolist()))))
    for c, count in ((0, 23), (1, 17)):
        assert [len(b) for b in bins[c]] == sizes[:, c].tolist()
        assert sorted(torch.cat(bins[c]).tolist()) == (labels == c).nonzero().flatten().tolist()
        members = (labels == c).nonzero().flatten()
        first = members[C.graphcut_order(C.similarity(table[members]), int(sizes[0, c]))]
        assert bins[c][0].tolist() == first.tolist(), "bin 1 is the GraphCut selection from the whole class"
    with pytest.raises(ValueError, match="each class's column summing"):
        C.quantization_bins(embed, labels, torch.ones(5, 2, dtype=torch.long))


def test_bin_order_prefixes_sample_every_bin_evenly():
    bins = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, 13)]
    order = C.bin_order(bins, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(13))
    owner = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)
    for m in range(1, 13):
        counts = torch.bincount(owner[order[:m]], minlength=3)
        full = torch.tensor([len(b) for b in bins])
        open_counts = counts[counts < full]
        if len(open_counts):
            assert int(open_counts.max() - open_counts.min()) <= 1, f"prefix {m}: {counts.tolist()}"
    with pytest.raises(ValueError, match="bins is empty"):
        C.bin_order([], torch.Generator())


def test_class_quotas_are_even_and_respect_class_sizes():
    gen = torch.Generator().manual_seed(0)
    q = C.class_quotas(13, [50] * 10, gen)
    assert int(q.sum()) == 13 and set(q.tolist()) == {1, 2} and int((q == 2).sum()) == 3
    q = C.class_quotas(20, [1, 50, 50, 50], gen)
    assert q.tolist()[0] == 1 and int(q.sum()) == 20 and int(q[1:].max() - q[1:].min()) <= 1
    assert C.class_quotas(6, [1, 2, 3], gen).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="total=7 must be an int between 0 and the 6 samples"):
        C.class_quotas(7, [1, 2, 3], gen)


def predicted_total(errors, counts, budget, alpha):
    return float((errors * (counts / budget) ** alpha).sum())


def test_allocate_budget_is_the_exact_optimum_of_the_predicted_error():
    errors = torch.tensor([0.5, 0.1, 0.3])
    counts = torch.tensor([2.0, 2.0, 3.0])
    caps = torch.tensor([6, 6, 4])
    for total in range(3, 17):
        got = C.allocate_budget(errors, counts, total, caps)
        best = min((b for b in itertools.product(*(range(1, int(c) + 1) for c in caps)) if sum(b) == total),
                   key=lambda b: predicted_total(errors, counts, torch.tensor(b, dtype=torch.float64), 0.5))
        assert int(got.sum()) == total and (got >= 1).all() and (got <= caps).all()
        assert predicted_total(errors, counts, got.double(), 0.5) == pytest.approx(
            predicted_total(errors, counts, torch.tensor(best, dtype=torch.float64), 0.5), abs=1e-12)


def test_allocate_budget_moves_samples_from_stable_to_sensitive_classes():
    counts = torch.full((4,), 5.0)
    same = C.allocate_budget(torch.full((4,), 0.2), counts, 20, torch.full((4,), 100))
    assert same.tolist() == [5, 5, 5, 5], "equal errors at equal counts keep the uniform budget"
    moved = C.allocate_budget(torch.tensor([0.0, 0.1, 0.2, 0.4]), counts, 20, torch.full((4,), 100))
    assert moved[0] == 1 and moved.tolist() == sorted(moved.tolist()) and int(moved.sum()) == 20


def test_allocate_budget_rejects_an_impossible_total():
    with pytest.raises(ValueError, match="total=3 cannot give every class between minimum=1 and its cap"):
        C.allocate_budget(torch.ones(4), torch.ones(4), 3, torch.full((4,), 9))
    with pytest.raises(ValueError, match="counts must be >= 1"):
        C.allocate_budget(torch.ones(2), torch.zeros(2), 3, torch.full((2,), 9))


@pytest.mark.parametrize("make", [lambda: MLP(12, 3, 5), lambda: SmallCNN(1, 3, 2)])
@pytest.mark.parametrize("loss_on", ["probabilities", "logits"])
def test_gradient_embeddings_are_the_per_sample_gradients_of_the_head(make, loss_on):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(4, 1, 3, 4), torch.tensor([0, 2, 1, 2])
    emb = C.gradient_embeddings(model, x, y, batch_size=3, loss_on=loss_on)
    for i in range(4):
        model.zero_grad()
        z = model(x[i : i + 1])
        F.cross_entropy(z.softmax(1) if loss_on == "probabilities" else z, y[i : i + 1]).backward()
        expected = torch.cat([model.head.bias.grad, model.head.weight.grad.flatten()])
        assert torch.allclose(emb[i], expected, atol=1e-6)


def test_gradient_embeddings_need_features_and_a_linear_head():
    with pytest.raises(TypeError, match="needs a features"):
        C.gradient_embeddings(torch.nn.Linear(3, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_on='softmax' must be 'probabilities'"):
        C.gradient_embeddings(MLP(3, 2, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), loss_on="softmax")


def test_mlp_shapes_and_errors():
    model = MLP(64, 10, 8)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and model.features(torch.zeros(2, 64)).shape == (2, 8)
    with pytest.raises(ValueError, match="MLP needs"):
        MLP(64, 1)


def test_fit_progress_false_draws_no_bar(monkeypatch, capsys):
    monkeypatch.setenv("EFFNB_PROGRESS", "1")
    fit(MLP(4, 2, 3), torch.randn(8, 4), torch.tensor([0, 1] * 4), epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    fit(MLP(4, 2, 3), torch.randn(8, 4), torch.tensor([0, 1] * 4), epochs=2)
    assert "train" in capsys.readouterr().err
