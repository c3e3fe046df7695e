#!/usr/bin/env bash
# Regenerates docs/results.md's tables and figures: runs the six
# experiments behind it (finished points are kept; pass --rerun to redo
# them), then copies each summary table into docs/results.md.
# Needs root for the real-guest study (QEMU is provisioned on first use).
# About 145 minutes on 2 cores from scratch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/bootstrap.sh
for name in mock-delay mock-contention real-gigantic real-offline real-vmem real-price; do
    .venv/bin/vhost-balloon experiment "experiments/$name.toml" --out "docs/results/$name" "$@"
done
.venv/bin/python -m vhost_balloon.backend.experiment.splice docs/results.md
