import socket

import pytest
import torch

from effnb import config


def test_resolve_profile_accepts_both_profiles(monkeypatch):
    monkeypatch.delenv("EFFNB_PROFILE", raising=False)
    assert config.resolve_profile("ci") == "ci"
    assert config.resolve_profile("full") == "full"


def test_environment_overrides_parameter(monkeypatch):
    monkeypatch.setenv("EFFNB_PROFILE", "full")
    assert config.resolve_profile("ci") == "full"


def test_unknown_profile_names_valid_ones(monkeypatch):
    monkeypatch.delenv("EFFNB_PROFILE", raising=False)
    with pytest.raises(ValueError, match=r"PROFILE='fast' is not valid; use one of 'ci', 'full'\."):
        config.resolve_profile("fast")


def test_unknown_profile_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("EFFNB_PROFILE", "gpu")
    with pytest.raises(ValueError, match=r"EFFNB_PROFILE='gpu' is not valid"):
        config.resolve_profile("ci")


def test_auto_device_on_this_machine_is_cpu_or_gpu():
    assert config.choose_device("auto").type in {"cpu", "cuda", "mps"}
    assert config.choose_device("cpu") == torch.device("cpu")


def test_unknown_device_names_valid_ones():
    with pytest.raises(ValueError, match=r"DEVICE='tpu' is not valid; use one of 'auto', 'cpu', 'cuda', 'mps'\."):
        config.choose_device("tpu")


def test_unavailable_cuda_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA GPU; set DEVICE='auto' or 'cpu'"):
        config.choose_device("cuda")


def test_unavailable_mps_says_what_to_use(monkeypatch):
    monkeypatch.setattr(config, "_mps_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no Apple GPU; set DEVICE='auto' or 'cpu'"):
        config.choose_device("mps")


def test_seed_everything_makes_torch_repeat():
    config.seed_everything(3)
    a = torch.randn(4)
    config.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed_is_refused(seed):
    with pytest.raises(TypeError, match="must be a non-negative integer"):
        config.seed_everything(seed)


def test_setup_returns_validated_run(monkeypatch):
    monkeypatch.delenv("EFFNB_PROFILE", raising=False)
    run = config.setup("ci", seed=1, device="cpu")
    assert run.profile == "ci" and run.is_ci and run.seed == 1 and run.device.type == "cpu"
    assert run.pick(ci=8, full=32) == 8
    assert config.setup("full", device="cpu").pick(ci=8, full=32) == 32


def test_progress_switch(monkeypatch):
    monkeypatch.setenv("EFFNB_PROGRESS", "0")
    assert not config.progress_enabled()
    monkeypatch.setenv("EFFNB_PROGRESS", "1")
    assert config.progress_enabled()


def test_network_is_blocked_at_once_in_tests():
    with pytest.raises(config.NetworkBlockedError, match="blocked"):
        socket.create_connection(("93.184.216.34", 80), timeout=30)
    with pytest.raises(config.NetworkBlockedError, match="blocked"):
        socket.getaddrinfo("example.com", 80)


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()


def test_smoke_run_picks_the_smoke_value_on_the_full_profile_only(monkeypatch):
    monkeypatch.delenv("EFFNB_PROFILE", raising=False)
    monkeypatch.setenv("EFFNB_SMOKE", "1")
    full = config.setup("full", 0, "cpu")
    assert full.smoke and full.pick(ci=1, full=100, smoke=5) == 5
    assert full.pick(ci=1, full=100) == 100, "without a smoke value the full one is used"
    ci = config.setup("ci", 0, "cpu")
    assert not ci.smoke and ci.pick(ci=1, full=100, smoke=5) == 1
    monkeypatch.setenv("EFFNB_SMOKE", "0")
    assert config.setup("full", 0, "cpu").pick(ci=1, full=100, smoke=5) == 100


def test_a_bad_smoke_value_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("EFFNB_SMOKE", "yes")
    with pytest.raises(ValueError, match=r"EFFNB_SMOKE='yes' is not valid; use one of '0', '1'\."):
        config.setup("full", 0, "cpu")
