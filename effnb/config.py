"""Profiles, devices and seeds: the first thing every chapter calls.

A chapter's papermill ``parameters`` cell sets ``PROFILE``, ``SEED`` and ``DEVICE``;
:func:`setup` validates them once and returns a :class:`Run` the rest of the notebook reads.
The environment variable ``EFFNB_PROFILE`` overrides the notebook's ``PROFILE`` so that
``EFFNB_PROFILE=full pytest --nbval-lax notebooks`` checks the full profile without editing files.
Introduced in Chapter 0.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "NetworkBlockedError",
    "PROFILES",
    "Run",
    "block_network",
    "check_choice",
    "choose_device",
    "progress_enabled",
    "resolve_profile",
    "seed_everything",
    "setup",
    "smoke_enabled",
]

Profile = Literal["ci", "full"]
PROFILES: tuple[str, ...] = ("ci", "full")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


def check_choice(name: str, value: object, choices: "tuple | list | dict") -> None:
    """Raise one ``ValueError`` sentence when ``value`` is not among ``choices``.

    The one wording every effnb module uses: ``NAME='x' is not valid; use one of 'a', 'b'.``
    Introduced in Chapter 0.
    """
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, choices))}.")


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


def smoke_enabled() -> bool:
    """Whether this is a GPU smoke run (``EFFNB_SMOKE=1``): the full profile's code paths and sizes,
    with steps and seeds cut, so that ``make gpu-smoke`` runs every chapter in minutes.

    Raises ``ValueError`` for a value other than ``0``/``1``. Introduced in Chapter 0.
    """
    value = os.environ.get("EFFNB_SMOKE", "0").strip() or "0"
    check_choice("EFFNB_SMOKE", value, ("0", "1"))
    return value == "1"


@dataclass(frozen=True)
class Run:
    """The validated settings of one chapter run: ``profile``, ``seed``, ``device``, ``smoke``.

    ``smoke`` is true for a GPU smoke run of the full profile (:func:`smoke_enabled`).
    """

    profile: Profile
    seed: int
    device: torch.device
    smoke: bool = False

    @property
    def is_ci(self) -> bool:
        """True on the small CPU profile."""
        return self.profile == "ci"

    def pick(self, ci: object, full: object, smoke: object = None) -> object:
        """Return ``ci`` on the ci profile and ``full`` on the full profile.

        On a smoke run of the full profile, return ``smoke`` instead where it is given: the
        full profile's sizes with fewer steps or seeds.
        """
        if self.is_ci:
            return ci
        return smoke if self.smoke and smoke is not None else full


def setup(profile: str = "ci", seed: int = 0, device: str = "auto", threads: int | None = None) -> Run:
    """Validate a chapter's parameters, seed everything and choose the device.

    ``threads`` caps torch's CPU threads (``None`` leaves torch's default). Returns a :class:`Run`.
    Introduced in Chapter 0.
    """
    chosen = resolve_profile(profile)
    smoke = smoke_enabled()
    seed_everything(seed)
    dev = choose_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    return Run(profile=chosen, seed=seed, device=dev, smoke=smoke and chosen == "full")


_LOOPBACK = ("127.", "::1", "localhost")


class NetworkBlockedError(RuntimeError):
    """Raised when code tries to reach another machine while the network is blocked."""


def block_network() -> None:
    """Make every connection to a non-loopback address fail at once (used by the tests).

    Loopback stays open because Jupyter kernels talk to their client over it.
    """
    if getattr(socket.socket, "_effnb_blocked", False):
        return
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def _check(address) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        if isinstance(host, str) and (host.startswith(_LOOPBACK) or host == "" or "/" in host):
            return
        raise NetworkBlockedError(f"network access to {host!r} is blocked; effnb runs offline by default.")

    def connect(self, address):  # noqa: ANN001 - socket's own signature
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return original_connect(self, address)

    def connect_ex(self, address):  # noqa: ANN001
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return original_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket._effnb_blocked = True  # type: ignore[attr-defined]
    original_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # noqa: ANN001
        if host not in (None, "localhost") and not str(host).startswith(_LOOPBACK):
            raise NetworkBlockedError(f"network access to {host!r} is blocked; effnb runs offline by default.")
        return original_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
