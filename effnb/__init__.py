"""effnb: the helper library of *Efficient Deep Learning, Hands-On*.

Layers (imports only point down): ``config``; ``data`` (with ``pointclouds``, which builds on it),
``plot``, ``show``, ``report``; ``models``, ``train``, ``measure``; technique modules (``roofline``,
``diffusion``, ``quant``, ``binary`` (with ``xnor``, its deployed engine, which builds on it), ``coreset``,
``tracing``, ``tokens``, ``distill``, ...).
"""
import os as _os

from effnb import config

__version__ = "0.1.0"

if _os.environ.get("EFFNB_BLOCK_NETWORK") == "1":
    # The tests set this so that notebook kernels, too, fail fast on any network access.
    config.block_network()
