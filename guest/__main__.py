"""`python -m vhost_balloon.guest`: see vhost_balloon.guest.cli."""

import sys

from vhost_balloon.guest.cli import main

sys.exit(main())
