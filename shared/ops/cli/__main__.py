"""``python -m shared.ops.cli``: couponctl."""

from shared.ops.cli import main

raise SystemExit(main())
