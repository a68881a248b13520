#!/usr/bin/env bash
# CI for the TRL integration: a fresh venv, the pinned install, the tests, and how long each took.
# Called from the repository's .ci/run; set VENV to build the venv elsewhere (default .venv-ci).
set -euo pipefail
cd "$(dirname "$0")"
source ../fresh_venv.sh
installed=$SECONDS
"$VENV/bin/python" -m pytest -q
echo "integrations/trl ci.sh: install $((installed - started))s, tests $((SECONDS - installed))s"
