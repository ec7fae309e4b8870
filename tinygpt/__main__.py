"""`python -m tinygpt` (and `torchrun -m tinygpt`) runs the command line."""

from tinygpt.cli import run

run()
