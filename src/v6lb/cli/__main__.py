"""``python -m v6lb.cli``: the `v6lb` command (the lab starts its processes this way)."""

from v6lb.cli import main

raise SystemExit(main())
