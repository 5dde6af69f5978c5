"""``python -m bnprobe`` (and ``torchrun -m bnprobe``): the command line."""

from .cli import main

main()
