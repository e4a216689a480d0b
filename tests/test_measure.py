import pytest
import torch
from torch import nn

from effnb import measure


def test_count_parameters_and_bytes():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert measure.count_parameters(model) == 10 * 20 + 20 + 20 * 5 + 5
    assert measure.model_bytes(model, bits=32) == 325 * 4
    assert measure.model_bytes(model, bits=4) == 325 / 2
    model[0].weight.requires_grad_(False)
    assert measure.count_parameters(model, trainable_only=True) == 325 - 200


def test_shared_parameters_count_once():
    layer = nn.Linear(4, 4)
    assert measure.count_parameters(nn.Sequential(layer, layer)) == 20


@pytest.mark.parametrize("bits", [0, -1, 65])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match=r"must lie in \(0, 64\]"):
        measure.model_bytes(nn.Linear(2, 2), bits=bits)


def test_flops_match_hand_count():
    linear = nn.Linear(64, 32)
    assert measure.count_flops(linear, torch.zeros(8, 64)) == 2 * 8 * 64 * 32
    conv = nn.Conv2d(3, 16, 3, padding=1)
    # Each output element: 3·3·3 multiply-adds; 16 channels × 10 × 10 positions × batch 2.
    assert measure.count_flops(conv, torch.zeros(2, 3, 10, 10)) == 2 * 2 * 16 * 10 * 10 * 27


def test_latency_is_median_of_repeats():
    calls = []
    assert measure.latency(lambda: calls.append(1), warmup=2, repeats=5) >= 0
    assert len(calls) == 7
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        measure.latency(lambda: None, repeats=0)


def test_peak_memory_counts_live_tensors():
    def three_buffers():
        a = torch.ones(1000, 250)  # 1 MB
        b = torch.ones(1000, 250)
        c = a + b
        return c

    assert measure.peak_memory(three_buffers) == 3 * 1_000_000


def test_peak_memory_sees_freed_tensors_go():
    def sequential():
        for _ in range(5):
            t = torch.ones(250_000)  # 1 MB, freed before the next
            del t

    assert measure.peak_memory(sequential) == 1_000_000


def test_machine_roofline_is_positive_and_consistent():
    machine = measure.measure_machine(matmul_size=256, copy_numel=1 << 20)
    assert machine.peak_flops > 1e8 and machine.bandwidth > 1e8
    assert machine.attainable(1e-3) == pytest.approx(1e-3 * machine.bandwidth)
    assert machine.attainable(1e6) == machine.peak_flops
    assert machine.attainable(machine.ridge) == pytest.approx(machine.peak_flops)


def test_matmul_intensity_formula():
    _, intensity = measure.measure_matmul(64, repeats=1)
    assert intensity == pytest.approx(2 * 64**3 / (3 * 64 * 64 * 4))


def test_last_level_cache_is_the_largest_cache_sysfs_lists(monkeypatch, tmp_path):
    files = []
    for i, text in enumerate(["48K", "2048K", "300M", "junk"]):
        (tmp_path / f"index{i}").write_text(text + "\n")
        files.append(str(tmp_path / f"index{i}"))
    monkeypatch.setattr(measure.glob, "glob", lambda pattern: files)
    assert measure.last_level_cache_bytes() == 300 * 2**20
    monkeypatch.setattr(measure.glob, "glob", lambda pattern: [])
    assert measure.last_level_cache_bytes() is None
