import re
import socket
import urllib.request

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


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(config, "_mps_available", lambda: mps)
    assert config.choose_device("auto") == torch.device(expected)
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


def test_widgets_are_off_outside_a_kernel_and_when_switched_off(monkeypatch):
    import tqdm
    import tqdm.notebook

    monkeypatch.setenv("EFFNB_WIDGETS", "1")
    assert not config.widgets_enabled(), "no IPython kernel here, so no widgets"
    monkeypatch.setenv("EFFNB_WIDGETS", "yes")
    with pytest.raises(ValueError, match="EFFNB_WIDGETS"):
        config.widgets_enabled()

    class Kernel:  # what get_ipython() returns inside a Jupyter kernel
        kernel = object()

    monkeypatch.setattr("IPython.get_ipython", lambda: Kernel())
    monkeypatch.setenv("EFFNB_WIDGETS", "1")
    assert config.widgets_enabled()
    monkeypatch.setenv("EFFNB_PROGRESS", "1")
    assert isinstance(config.progress_bar(range(3), "x"), tqdm.notebook.tqdm)
    monkeypatch.setenv("EFFNB_WIDGETS", "0")  # what the book's runners set
    assert not config.widgets_enabled()
    bar = config.progress_bar(range(3), "x")
    assert not isinstance(bar, tqdm.notebook.tqdm) and isinstance(bar, tqdm.tqdm) and not bar.disable
    assert list(bar) == [0, 1, 2]
    monkeypatch.setenv("EFFNB_PROGRESS", "0")
    assert config.progress_bar(range(3), "x").disable
    assert config.progress_bar(range(3), "x", enabled=False).disable


def test_network_is_blocked_at_once_in_tests():
    with pytest.raises(config.NetworkBlockedError, match="blocked"):
        socket.create_connection(("93.184.216.34", 80), timeout=30)
    with pytest.raises(config.NetworkBlockedError, match="blocked"):
        socket.getaddrinfo("example.com", 80)


@pytest.mark.parametrize("host", ["localhost.attacker.example", "127.x.example", "127.0.0.1.nip.io",
                                  "::1.example", "localhostx", "0x7f.example"])
def test_look_alike_names_are_not_loopback(host):
    with pytest.raises(config.NetworkBlockedError, match=f"network access to '{host}' is blocked"):
        socket.getaddrinfo(host, 80)
    with pytest.raises(config.NetworkBlockedError, match="is blocked"):
        socket.create_connection((host, 80), timeout=5)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "127.3.2.1", "::1"])
def test_loopback_names_and_addresses_still_resolve(host):
    assert socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)


@pytest.mark.parametrize("resolve", [socket.gethostbyname, socket.gethostbyname_ex, socket.gethostbyaddr],
                         ids=lambda f: f.__name__)
def test_every_resolver_is_blocked(resolve):
    with pytest.raises(config.NetworkBlockedError, match="'example.com' is blocked"):
        resolve("example.com")
    assert "127.0.0.1" in str(socket.gethostbyname("localhost"))
    assert socket.getfqdn()  # this machine's own name still resolves (http.server and others need it)


def test_datagrams_are_blocked_except_to_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        client.sendto(b"local", server.getsockname())
        assert server.recv(16) == b"local"
        with pytest.raises(config.NetworkBlockedError, match="'93.184.216.34' is blocked"):
            client.sendto(b"dns?", ("93.184.216.34", 53))
        with pytest.raises(config.NetworkBlockedError, match="'93.184.216.34' is blocked"):
            client.sendto(b"dns?", 0, ("93.184.216.34", 53))


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
def test_a_proxy_on_loopback_does_not_open_a_way_out(monkeypatch, variable):
    # A proxy on 127.0.0.1 would forward to the internet: the guard refuses the proxy's address.
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(1)
        port = proxy.getsockname()[1]
        monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
        with pytest.raises(config.NetworkBlockedError, match=rf"proxy 127\.0\.0\.1:{port} \({variable}\) is blocked"):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        with pytest.raises(config.NetworkBlockedError):  # through the proxy (HTTPS_PROXY) or directly (urllib ignores ALL_PROXY)
            # a fresh opener reads the proxy now (urlopen would cache it for later tests)
            urllib.request.build_opener().open("https://example.com/", timeout=2)
        proxy.setblocking(False)
        with pytest.raises(BlockingIOError):
            proxy.accept()  # nothing reached the proxy


def test_loopback_stays_open_while_the_guard_is_on():
    assert getattr(socket.socket, "_effnb_blocked", False), "conftest.py installs the guard"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            connection, _ = server.accept()
            client.sendall(b"ping")
            assert connection.recv(4) == b"ping"
            connection.close()
    with pytest.raises(config.NetworkBlockedError):  # the same call to another machine is refused
        socket.create_connection(("10.0.0.1", port), timeout=5)


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


@pytest.fixture
def dry_check_stopped(monkeypatch):
    """A dry run's setup starts a device check for the rest of the process; stop the one a test starts."""
    monkeypatch.setattr(config, "_ACTIVE_CHECK", [])
    yield config._ACTIVE_CHECK
    for check in config._ACTIVE_CHECK:
        check.__exit__(None, None, None)


def test_a_dry_run_picks_the_dry_value_then_the_smoke_value_on_the_full_profile_only(monkeypatch, dry_check_stopped):
    monkeypatch.delenv("EFFNB_PROFILE", raising=False)
    monkeypatch.setenv("EFFNB_SMOKE", "dry")
    full = config.setup("full", 0, "cpu")
    assert full.dry and full.smoke and config.smoke_mode() == "dry"
    assert full.pick(ci=1, full=100, smoke=5, dry=2) == 2
    assert full.pick(ci=1, full=100, smoke=5) == 5, "without a dry value the smoke one is used"
    assert full.pick(ci=1, full=100) == 100, "a size: the full profile's own"
    ci = config.setup("ci", 0, "cpu")
    assert not ci.dry and ci.pick(ci=1, full=100, smoke=5, dry=2) == 1
    monkeypatch.setenv("EFFNB_SMOKE", "1")
    assert config.setup("full", 0, "cpu").pick(ci=1, full=100, smoke=5, dry=2) == 5


def test_a_bad_smoke_value_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("EFFNB_SMOKE", "yes")
    with pytest.raises(ValueError, match=r"EFFNB_SMOKE='yes' is not valid; use one of '0', '1', 'dry'\."):
        config.setup("full", 0, "cpu")


def test_device_check_finds_a_host_input_beside_a_model_on_the_device():
    from torch import nn
    with config.DeviceCheck():
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.device("cpu"))
        assert all(config.on_device(t) for t in [*model.parameters(), *model.buffers()])
        host = torch.randn(5, 3)
        with pytest.raises(RuntimeError, match=re.escape("Linear holds its parameters on the device but got an input "
                                                         "of shape (5, 3) on the host: on a GPU this raises; move the "
                                                         "input with .to(run.device).")):
            model(host)
        moved = host.to(torch.device("cpu"))
        assert config.on_device(moved) and not config.on_device(host), "a no-op move still leaves the source on the host"
        out = model(moved)
        assert config.on_device(out) and config.on_device(out[1:] * 2), "what is computed from the device stays there"
        assert not config.on_device(out.cpu()) and config.on_device(out.float())
        made = torch.zeros(2, 3, device="cpu")
        assert config.on_device(made) and not config.on_device(torch.zeros(2, 3))
        assert config.on_device(torch.ones(2).to(made)) and not config.on_device(made.to(torch.zeros(1)))
        with pytest.raises(RuntimeError, match=re.escape("Linear holds its parameters on the host but got an input of "
                                                         "shape (2, 3) on the device: on a GPU this raises; move the "
                                                         "module with .to(run.device).")):
            nn.Linear(3, 1)(made)
        import copy
        assert all(config.on_device(t) for t in copy.deepcopy(model).parameters()), "a deep copy stays where it was"
        assert not config.on_device(model.cpu()[0].weight), "module.cpu() brings it back"
        model[0](torch.randn(2, 3)[0])                     # a 0-d or host input beside a host module: fine
    nn.Linear(3, 1).to("cpu")(torch.randn(2, 3))           # outside the block: no check, no hook left behind
    assert nn.Parameter.__deepcopy__ is not None and "keeping_place" not in nn.Parameter.__deepcopy__.__name__


def test_a_dry_run_checks_devices_from_setup_on(monkeypatch, dry_check_stopped):
    monkeypatch.setenv("EFFNB_SMOKE", "dry")
    config.setup("full", 0, "cpu")
    config.setup("full", 0, "cpu")
    assert len(dry_check_stopped) == 1, "one check, however often setup runs"
    from torch import nn
    with pytest.raises(RuntimeError, match="on a GPU this raises"):
        nn.Linear(3, 1).to("cpu")(torch.randn(2, 3))
