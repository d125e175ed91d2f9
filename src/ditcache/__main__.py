"""`python -m ditcache ...` (and `torchrun --nproc_per_node N -m ditcache ...`): the command line."""

from .cli import main

raise SystemExit(main())
