"""``python -m dpzo`` runs the same CLI as the ``dpzo`` console script."""

from dpzo.cli import main

raise SystemExit(main())
