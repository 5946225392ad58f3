"""`python -m dspark_hf.cli`: the `dspark-hf` command (e.g. under `accelerate launch` or `torchrun`)."""

from . import main

raise SystemExit(main())
