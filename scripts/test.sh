#!/usr/bin/env bash
# The tests, as CI runs them. The default suite runs in a fresh environment with rayworld's
# default dependencies (numpy 2, what `pip install rayworld` resolves); the nuScenes tests run
# in a second one, since nuscenes-devkit pins numpy<2 (and with it pyarrow<22).
# Arguments go to the first pytest, e.g. scripts/test.sh -m slow.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 SDL_VIDEODRIVER=dummy PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

run_in() {  # run_in <env dir> <extras> <pytest args...>
  local env=$1 extras=$2
  shift 2
  "$python" -m venv --clear "$env"
  "$env/bin/pip" install -q --disable-pip-version-check torch==2.13.0 -e ".[$extras]"
  # tests start `rayworld` and `ray` by name: the ones of this environment
  PATH="$PWD/$env/bin:$PATH" "$env/bin/python" -m pytest "$@"
}

run_in .venv/test test "$@"
run_in .venv/nuscenes test,nuscenes -m nuscenes tests/test_sources.py
