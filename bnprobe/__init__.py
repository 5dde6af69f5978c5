"""bnprobe: what batch normalization does to your network, measured."""

__version__ = "0.1.0"
