"""`python -m lxm.cli` (and `torchrun ... -m lxm.cli`) runs the `lxm` command line."""

from lxm.cli import main

main()
