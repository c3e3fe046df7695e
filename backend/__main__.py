"""`python -m vhost_balloon.backend` is `vhost-balloon`."""

from vhost_balloon.backend.cli.main import main

raise SystemExit(main())
