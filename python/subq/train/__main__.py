"""``python -m subq.train``: see :mod:`subq.train.cli`."""

from subq.train.cli import main

raise SystemExit(main())
