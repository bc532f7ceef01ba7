"""dpt_scale: Dual Pseudo Training at scale."""

__version__ = "0.1.0"
