# Sourced by each integration's ci.sh, from its own folder: a fresh venv in $VENV (default
# .venv-ci) with the folder's pinned requirements.txt; $started holds when it began.
VENV="${VENV:-.venv-ci}"
started=$SECONDS
python3 -m venv --clear "$VENV"
"$VENV/bin/pip" install -r requirements.txt
