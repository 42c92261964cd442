"""``python -m torchbayes``: the same as the ``torchbayes`` command."""

from torchbayes.cli.main import main

raise SystemExit(main())
