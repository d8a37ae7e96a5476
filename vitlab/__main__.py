"""`python -m vitlab ...` (and `torchrun --nproc_per_node=N -m vitlab train ...`)."""
import sys

from .cli import main

sys.exit(main())
