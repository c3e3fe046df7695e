"""`python -m guest`: see guest.cli."""

import sys

from guest.cli import main

sys.exit(main())
