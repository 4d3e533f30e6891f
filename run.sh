#!/usr/bin/env bash
# One entry point for a fresh machine: `bash run.sh demo` or `bash run.sh test`.
# Creates .venv (Python 3.11, CPU torch) on first use or when pyproject.toml changes, then runs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ] || ! cmp -s <(sha256sum pyproject.toml) .venv/.install-stamp; then
  echo "setting up .venv (one time, about a minute)..." >&2
  "$PY" -m venv .venv
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[data,train,dev]'
  sha256sum pyproject.toml > .venv/.install-stamp
fi
export PYTHONUNBUFFERED=1
case "${1:-}" in
  demo) shift; exec .venv/bin/kiln demo "$@" ;;
  test) shift; exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: bash run.sh demo|test [args...]" >&2; exit 2 ;;
esac
