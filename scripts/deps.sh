#!/usr/bin/env bash
# The test environment's lock, and the check against the newest allowed versions.
#
#   scripts/deps.sh latest   install the newest versions pyproject.toml allows into a fresh
#                            virtualenv (.venv-latest) and run the test suite there: an
#                            upgrade is then a decision made with evidence.
#   scripts/deps.sh lock     the same, and when the suite passes, write what was installed to
#                            requirements/lock.txt (pip freeze of that clean virtualenv): the
#                            versions .ci/run and the README's test command install.
#
# torch is installed first at the version the lock names (here the local CPU build), so
# pip never pulls a CUDA build; the user install (pip install -e .) keeps the ranges of
# pyproject.toml, capped below the next major version of what was tested.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-latest}
case "$mode" in latest|lock) ;; *) echo "usage: scripts/deps.sh latest|lock" >&2; exit 2 ;; esac
venv=.venv-latest
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q --upgrade -e ".[dev]"
pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' > "$venv/freeze.txt"
ruff check src tests
python -m pytest -q
if [ "$mode" = lock ]; then
  {
    echo "# The test environment (pip constraints), written by scripts/deps.sh lock on $(date -u +%Y-%m-%d)"
    echo "# from a clean virtualenv with Python $(python -c 'import platform; print(platform.python_version())'); refresh with: scripts/deps.sh lock"
    cat "$venv/freeze.txt"
  } > requirements/lock.txt
  echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
fi
