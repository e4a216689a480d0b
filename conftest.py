"""Test-wide settings: no network, quiet progress bars, the ci profile, a small thread count.

The environment variables are inherited by the Jupyter kernels that nbval starts, and
``effnb/__init__.py`` installs the same socket guard in them when ``EFFNB_BLOCK_NETWORK=1``.
"""
import os

os.environ["EFFNB_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["EFFNB_PROGRESS"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")

from effnb.config import block_network  # noqa: E402

block_network()
