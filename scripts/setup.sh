#!/usr/bin/env bash
# Set up ucdseg in a virtual environment at .venv (idempotent).
#   bash scripts/setup.sh         # the package and its runtime dependencies
#   bash scripts/setup.sh --dev   # plus the test dependencies
# Also installs Debian's Fashion-MNIST (the embedded benchmark's source) when it is missing and
# this runs as root; otherwise it says where to get it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -z "${UCDSEG_FASHION_MNIST:-}" ] && [ ! -e "$fmnist" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's dataset-fashion-mnist ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST not found. Install the Debian package dataset-fashion-mnist (as root)," >&2
    echo "      or download the four IDX files from github.com/zalandoresearch/fashion-mnist and set" >&2
    echo "      UCDSEG_FASHION_MNIST=/path/to/that/folder." >&2
  fi
fi
echo "ucdseg is set up in .venv ($(.venv/bin/python -c 'import ucdseg, torch; print("ucdseg", ucdseg.__version__, "torch", torch.__version__)'))"
