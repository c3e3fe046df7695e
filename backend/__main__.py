"""`python -m backend` is `vhost-balloon`."""

from backend.cli import main

raise SystemExit(main())
