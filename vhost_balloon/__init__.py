"""vhost-balloon: the one name this project installs.

The code lives in the top-level folders `protocol/`, `backend/` and `guest/`;
pyproject.toml installs them as `vhost_balloon.protocol`, `vhost_balloon.backend`
and `vhost_balloon.guest` (setuptools package-dir). The symbolic links beside
this file give a checkout the same names, so that pytest, mypy and
import-linter see exactly what an installation sees.
"""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
