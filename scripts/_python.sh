# Sourced by the scripts in this folder: sets $repo (the checkout) and $py (the Python that has
# ucdseg installed: $PYTHON if set, else the checkout's .venv, else python3).
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
  py=$repo/.venv/bin/python
else
  py=python3
fi
