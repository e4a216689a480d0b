"""Test-wide settings: no network, quiet progress bars, the ci profile, a small thread count,
and :func:`skip_or_fail` for tests that need something this machine may lack.

The environment variables are inherited by the Jupyter kernels that nbval starts, and
``effnb/__init__.py`` installs the same socket guard in them when ``EFFNB_BLOCK_NETWORK=1``.
"""
import os

import pytest

os.environ["EFFNB_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["EFFNB_PROGRESS"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")

from effnb.config import block_network  # noqa: E402

block_network()


def skip_or_fail(reason: str) -> None:
    """Skip the calling test with ``reason`` locally, but fail it when ``CI`` is set (``true``/``1``/``yes``).

    On a CI machine a missing browser or checkpoint means the setup is broken, and a skip would
    hide it behind a green run; on a reader's machine it is a choice, so it stays a skip.
    """
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{reason}; CI is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny tensors on one thread (use with ``pytestmark``); on two shared cores
    a second thread only waits for the other one. The previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
