"""`python -m vhost_balloon.backend` is `vhost-balloon`."""

from vhost_balloon.backend.cli import main

raise SystemExit(main())
