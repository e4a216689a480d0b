"""Profiles, devices and seeds: the first thing every chapter calls (and where the package's data lives).

A chapter's papermill ``parameters`` cell sets ``PROFILE``, ``SEED`` and ``DEVICE``;
:func:`setup` validates them once and returns a :class:`Run` the rest of the notebook reads.
The environment variable ``EFFNB_PROFILE`` overrides the notebook's ``PROFILE`` so that
``EFFNB_PROFILE=full pytest --nbval-lax notebooks`` checks the full profile without editing files.
Introduced in Chapter 0.
"""
from __future__ import annotations

import ipaddress
import os
import random
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "NetworkBlockedError",
    "PROFILES",
    "Run",
    "block_network",
    "check_choice",
    "check_count",
    "choose_device",
    "data_dir",
    "is_loopback",
    "progress_bar",
    "progress_enabled",
    "resolve_profile",
    "seed_everything",
    "setup",
    "smoke_enabled",
    "smoke_mode",
    "DeviceCheck",
    "SMOKE_MODES",
    "on_device",
    "widgets_enabled",
]

Profile = Literal["ci", "full"]
PROFILES: tuple[str, ...] = ("ci", "full")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


def data_dir(name: str) -> Path:
    """``data/<name>`` of the repository when effnb runs from a clone; otherwise the copy the wheel carries as
    package data, ``effnb/<name>`` (pyproject.toml), e.g. on Colab: the reference checkpoints
    (``effnb.train.CHECKPOINT_DIR``) and the stored sweeps (``effnb.experiments.RESULTS_DIR``)."""
    package = Path(__file__).resolve().parent
    repository = package.parent / "data" / name
    return repository if repository.is_dir() else package / name


def check_choice(name: str, value: object, choices: "tuple | list | dict") -> None:
    """Raise one ``ValueError`` sentence when ``value`` is not among ``choices``.

    The one wording every effnb module uses: ``NAME='x' is not valid; use one of 'a', 'b'.``
    Introduced in Chapter 0.
    """
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, choices))}.")


def check_count(name: str, value: object, example: int) -> None:
    """Raise one sentence unless ``value`` is a whole number >= 1 (a step, epoch, batch or size count).

    ``TypeError`` for a non-int (``1.5``, ``"3"``, ``True``), ``ValueError`` for 0 or less; both read
    ``NAME=v must be a whole number >= 1, e.g. NAME=example.`` Introduced in Chapter 0.
    """
    message = f"{name}={value!r} must be a whole number >= 1, e.g. {name}={example}."
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(message)
    if value < 1:
        raise ValueError(message)


def resolve_profile(profile: str) -> Profile:
    """Return the profile to run: ``EFFNB_PROFILE`` if set, else ``profile``.

    Raises ``ValueError`` naming the valid profiles for anything else. Introduced in Chapter 0.
    """
    chosen = os.environ.get("EFFNB_PROFILE", "").strip() or profile
    check_choice("EFFNB_PROFILE" if os.environ.get("EFFNB_PROFILE", "").strip() else "PROFILE", chosen, PROFILES)
    return chosen  # type: ignore[return-value]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def choose_device(device: str = "auto") -> torch.device:
    """Map ``"auto"`` to cuda, then mps, then cpu; check that an explicit choice exists.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a device this machine
    lacks, each naming what to use instead. Introduced in Chapter 0.
    """
    check_choice("DEVICE", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE='cuda' but this machine has no CUDA GPU; set DEVICE='auto' or 'cpu'.")
    if device == "mps" and not _mps_available():
        raise RuntimeError("DEVICE='mps' but this machine has no Apple GPU; set DEVICE='auto' or 'cpu'.")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) so that a rerun prints the same.

    Raises ``TypeError`` unless ``seed`` is a non-negative int. Introduced in Chapter 0.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"SEED={seed!r} must be a non-negative integer, e.g. SEED = 0.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_enabled() -> bool:
    """Whether effnb's progress bars draw: off when ``EFFNB_PROGRESS=0`` (set by the tests)."""
    return os.environ.get("EFFNB_PROGRESS", "1") != "0"


def widgets_enabled() -> bool:
    """Whether to draw Jupyter widgets (progress bars, Chapter 1's what-if controls).

    True only inside a Jupyter kernel (JupyterLab, Colab) with ipywidgets installed, and not when
    ``EFFNB_WIDGETS=0``: the book's runners (papermill, nbval, the grader) set it, so that no widget
    state enters stored outputs or nbval comparisons; there the text fallback runs instead.
    """
    value = os.environ.get("EFFNB_WIDGETS", "1").strip() or "1"
    check_choice("EFFNB_WIDGETS", value, ("0", "1"))
    if value == "0":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_bar(iterable, desc: str | None = None, *, enabled: bool = True, mininterval: float = 1.0):
    """Wrap ``iterable`` in a tqdm progress bar: a widget bar where :func:`widgets_enabled`, text elsewhere.

    The bar is silent when ``enabled`` is false or ``EFFNB_PROGRESS=0``. Introduced in Chapter 0.
    """
    if widgets_enabled():
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not (enabled and progress_enabled()), mininterval=mininterval)


SMOKE_MODES: tuple[str, ...] = ("0", "1", "dry")


def smoke_mode() -> str:
    """``EFFNB_SMOKE``: ``"0"`` (a real run), ``"1"`` (a GPU smoke run: the full profile's sizes, steps
    and seeds cut, so that ``make gpu-smoke`` runs every chapter in minutes) or ``"dry"`` (the full
    profile's sizes on the CPU with every repetition cut to one or two, so that ``make full-dry``
    checks the full profile's code path without a GPU). Raises ``ValueError`` for any other value.
    Introduced in Chapter 0.
    """
    value = os.environ.get("EFFNB_SMOKE", "0").strip() or "0"
    check_choice("EFFNB_SMOKE", value, SMOKE_MODES)
    return value


def smoke_enabled() -> bool:
    """Whether this is a smoke run of either kind (``EFFNB_SMOKE=1`` or ``dry``). Introduced in Chapter 0."""
    return smoke_mode() != "0"


@dataclass(frozen=True)
class Run:
    """The validated settings of one chapter run: ``profile``, ``seed``, ``device``, ``smoke``.

    ``smoke`` is true for a GPU smoke run of the full profile (:func:`smoke_enabled`).
    """

    profile: Profile
    seed: int
    device: torch.device
    smoke: bool = False
    dry: bool = False

    @property
    def is_ci(self) -> bool:
        """True on the small CPU profile."""
        return self.profile == "ci"

    def pick(self, ci: object, full: object, smoke: object = None, dry: object = None) -> object:
        """Return ``ci`` on the ci profile and ``full`` on the full profile.

        On a smoke run of the full profile, return ``smoke`` instead where it is given: the
        full profile's sizes with fewer steps or seeds. On a dry run, return ``dry`` where it is
        given, else ``smoke`` where that is: a repetition cut to one or two. Give ``smoke`` and
        ``dry`` only for repetitions (steps, seeds, samples, rounds), never for a size, so that both
        runs take the full profile's own shapes.
        """
        if self.is_ci:
            return ci
        if self.dry and dry is not None:
            return dry
        return smoke if self.smoke and smoke is not None else full


def setup(profile: str = "ci", seed: int = 0, device: str = "auto", threads: int | None = None) -> Run:
    """Validate a chapter's parameters, seed everything and choose the device.

    ``threads`` caps torch's CPU threads (``None`` leaves torch's default). Returns a :class:`Run`.
    Introduced in Chapter 0.
    """
    chosen = resolve_profile(profile)
    mode = smoke_mode()
    seed_everything(seed)
    dev = choose_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    full = chosen == "full"
    if mode == "dry" and full:
        _start_device_check()
    return Run(profile=chosen, seed=seed, device=dev, smoke=mode != "0" and full, dry=mode == "dry" and full)


_ACTIVE_CHECK: list[DeviceCheck] = []


def _start_device_check() -> None:
    """A dry run checks device placement from here to the end of the process (once, however often setup runs)."""
    if not _ACTIVE_CHECK:
        _ACTIVE_CHECK.append(DeviceCheck().__enter__())


# ---------------------------------------------------------------------------- device hygiene in a dry run
_TAG = "_effnb_on_device"
_FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange", "linspace",
              "logspace", "eye", "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like",
              "rand_like", "randn_like", "randint_like", "normal", "from_numpy"}
_TO_HOST = {"cpu", "numpy", "tolist", "item"}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def on_device(t: torch.Tensor) -> bool:
    """Whether a dry run counts ``t`` as living on the run's device (see :class:`DeviceCheck`)."""
    return bool(getattr(t, _TAG, False))


def _moved_to_device(args: tuple, kwargs: dict) -> bool:
    """Where a ``.to(...)`` call leaves its result: on the device when it names a device or follows a
    tensor there, on the host when it follows a host tensor, and where its source is for a dtype only."""
    followed = [a for a in args[1:] if isinstance(a, torch.Tensor)] + _tensors(kwargs.get("other"))
    if followed:
        return on_device(followed[0])
    named = kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])
    return named or on_device(args[0])


class DeviceCheck(torch.overrides.TorchFunctionMode):
    """Finds, on the CPU, the tensors a GPU run would leave on the host beside a model on the GPU.

    In a dry run everything is on the CPU, so a tensor the chapter forgot to move still works. This
    mode follows where each tensor *would* be: a tensor is on the device once it is moved there
    (``.to(device)``, ``.cuda()``, a module's ``.to``), made there (a factory call with ``device=``) or
    computed from one that is; ``.cpu()`` brings it back. Every call of a module that holds parameters
    or buffers then checks that each input of one or more dimensions is where the module's own
    tensors are, and raises ``RuntimeError`` naming both, as CUDA would.

    It covers every module call, in effnb or in the chapter. It cannot see a mismatch between two
    tensors outside a module call (``x_host + y_device`` in plain code), a tensor made under
    ``with torch.device(...)``, or a host tensor a module makes inside its own forward. Introduced in Chapter 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hook = None
        self._deepcopy = torch.nn.Parameter.__deepcopy__

    def __enter__(self) -> DeviceCheck:
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._check)
        original = self._deepcopy

        def deepcopy_keeping_place(param: torch.nn.Parameter, memo: dict) -> torch.nn.Parameter:
            copied = original(param, memo)               # a Parameter's copy is a new object: carry its place over
            setattr(copied, _TAG, on_device(param))
            return copied

        torch.nn.Parameter.__deepcopy__ = deepcopy_keeping_place
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        torch.nn.Parameter.__deepcopy__ = self._deepcopy
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda", "cpu") and out is args[0] and not isinstance(out, torch.nn.Parameter):
            out = out.view_as(out)         # a no-op move on the CPU: a new tensor, so that the source keeps its place
        if name in _TO_HOST:
            if isinstance(out, torch.nn.Parameter):
                setattr(out, _TAG, False)
            return out
        if name in ("to", "cuda"):
            moved = name == "cuda" or _moved_to_device(args, kwargs)
        elif name in _FACTORIES and kwargs.get("device") is not None:
            moved = True
        else:
            moved = any(on_device(t) for t in _tensors(args) + _tensors(kwargs))
        if moved:
            for t in _tensors(out):
                setattr(t, _TAG, True)
        return out

    @staticmethod
    def _check(module: torch.nn.Module, args: tuple) -> None:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not own:
            return
        here = on_device(own[0])
        for t in _tensors(args):
            if t.dim() > 0 and on_device(t) != here:
                where = ("on the device", "on the host")
                raise RuntimeError(f"{type(module).__name__} holds its parameters {where[not here]} but got an "
                                   f"input of shape {tuple(t.shape)} {where[here]}: on a GPU this raises; move "
                                   f"{'the input' if here else 'the module'} with .to(run.device).")


class NetworkBlockedError(RuntimeError):
    """Raised when code tries to reach another machine while the network is blocked."""


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                    "FTP_PROXY", "ftp_proxy", "WS_PROXY", "ws_proxy", "WSS_PROXY", "wss_proxy")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}


def is_loopback(host: object) -> bool:
    """Whether ``host`` names this machine exactly: an address in 127.0.0.0/8 or ``::1`` (also as
    ``::ffff:127.x.y.z``), the name ``localhost`` (any case), or ``""`` (Python's "this host").

    Look-alikes such as ``localhost.example.org`` or ``127.0.0.1.nip.io`` are other machines.
    Introduced in Chapter 0.
    """
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host == "" or host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone such as %lo
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


_SEEN_PROXY_PORTS: dict[int, str] = {}


def _proxy_on(host: object, port: object) -> str | None:
    """The proxy variable that names loopback ``host:port`` as a proxy, now or at any earlier check
    (read at each call, so a proxy set after :func:`block_network` is caught too, and remembered,
    because an HTTP client may keep a proxy it read before the variable was removed)."""
    _remember_proxies()
    return _SEEN_PROXY_PORTS.get(port) if isinstance(port, int) else None


def _remember_proxies() -> None:
    for variable in _PROXY_VARIABLES:
        url = os.environ.get(variable, "").strip()
        if not url:
            continue
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        try:
            proxy_port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 80)
        except ValueError:
            continue
        if is_loopback(parts.hostname or ""):
            _SEEN_PROXY_PORTS.setdefault(proxy_port, variable)


def _refuse(host: object) -> NetworkBlockedError:
    return NetworkBlockedError(f"network access to {host!r} is blocked; effnb runs offline by default.")


def _check_address(address: object) -> None:
    """Raise unless an AF_INET/AF_INET6 ``address`` is loopback and not a proxy's."""
    host, port = (address[0], address[1]) if isinstance(address, tuple) and len(address) >= 2 else (address, None)
    if not is_loopback(host):
        raise _refuse(host)
    variable = _proxy_on(host, port)
    if variable is not None:
        raise NetworkBlockedError(f"network access through the proxy {host}:{port} ({variable}) is blocked; "
                                  "effnb runs offline by default.")


def _check_host(host: object) -> None:
    """Raise unless a name to resolve is loopback or this machine's own name (``socket.getfqdn``,
    ``http.server`` and others look it up; the address it gives is still checked at connect time).
    ``None`` asks for the local wildcard address."""
    if host is not None and not is_loopback(host) and host != socket.gethostname():
        raise _refuse(host)


def block_network() -> None:
    """Make every connection to another machine fail at once (the tests and the notebook runs call it).

    What it covers, in this process (children inherit it through ``EFFNB_BLOCK_NETWORK=1``, which
    makes ``import effnb`` call it):

    - sockets: ``connect``, ``connect_ex``, ``sendto`` and ``sendmsg`` of AF_INET/AF_INET6 sockets
      reach only loopback (:func:`is_loopback`: 127.0.0.0/8, ``::1``, ``localhost`` exactly), since
      Jupyter kernels talk to their client over it; Unix sockets are left alone;
    - name resolution: ``getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex`` and
      ``gethostbyaddr`` refuse any other name except this machine's own (``create_connection``
      resolves through ``getaddrinfo``), so no DNS query for another machine leaves;
    - proxies: a proxy on loopback would forward a request to the internet, so a loopback address
      that a proxy variable (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ..., either case) names
      is refused too. The variables are read at each connection rather than cleared once, so a
      proxy set later is caught, and child processes that are meant to reach the network (``pip``
      in a test) keep their proxy settings. A proxy on another machine is refused anyway.

    Calling it twice does nothing. Introduced in Chapter 0.
    """
    if getattr(socket.socket, "_effnb_blocked", False):
        return
    _remember_proxies()
    original = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto", "sendmsg")}

    def _guarded(self) -> bool:  # noqa: ANN001
        return self.family in (socket.AF_INET, socket.AF_INET6)

    def connect(self, address):  # noqa: ANN001 - socket's own signature
        if _guarded(self):
            _check_address(address)
        return original["connect"](self, address)

    def connect_ex(self, address):  # noqa: ANN001
        if _guarded(self):
            _check_address(address)
        return original["connect_ex"](self, address)

    def sendto(self, data, *flags_and_address):  # noqa: ANN001 - sendto(data, [flags,] address)
        if _guarded(self) and flags_and_address:
            _check_address(flags_and_address[-1])
        return original["sendto"](self, data, *flags_and_address)

    def sendmsg(self, buffers, *rest):  # noqa: ANN001 - sendmsg(buffers[, ancdata[, flags[, address]]])
        if _guarded(self) and len(rest) >= 3 and rest[2] is not None:
            _check_address(rest[2])
        return original["sendmsg"](self, buffers, *rest)

    for name, method in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto), ("sendmsg", sendmsg)):
        setattr(socket.socket, name, method)
    socket.socket._effnb_blocked = True  # type: ignore[attr-defined]

    def _resolver(resolve):  # noqa: ANN001, ANN202
        def guarded(host, *args, **kwargs):  # noqa: ANN001, ANN202
            _check_host(host)
            return resolve(host, *args, **kwargs)

        guarded.__name__ = resolve.__name__
        return guarded

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, _resolver(getattr(socket, name)))
