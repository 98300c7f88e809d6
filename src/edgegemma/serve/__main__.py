"""``python -m edgegemma.serve``: the same as ``edgegemma serve``."""

from .cli import main

raise SystemExit(main())
