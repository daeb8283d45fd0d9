"""``python -m subq.profile``: the same as the ``subq-profile`` console script."""

from subq.profile.cli import main

raise SystemExit(main())
