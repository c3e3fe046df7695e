#!/usr/bin/env bash
# The whole test suite: installs what it needs, then ruff, mypy --strict,
# import-linter's contracts (pyproject.toml), pytest, a short fuzzing run.
# Extra arguments go to pytest (e.g. scripts/test.sh -k discard).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/bootstrap.sh

# System tools the tests run: systemd's socket activator and unit checker,
# libvirt's domain validator (with xmllint, which it runs).
need=()
command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null ||
    need+=(systemd)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
if [ ${#need[@]} -gt 0 ]; then
    echo "== apt-get install ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi

echo "== ruff" >&2
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== lint-imports" >&2
.venv/bin/lint-imports --no-cache --config pyproject.toml
echo "== pytest" >&2
.venv/bin/pytest "$@"
echo "== fuzz (a short run of every target; scripts/fuzz.py for the long one)" >&2
.venv/bin/python scripts/fuzz.py --runs 3000
