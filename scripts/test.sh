#!/usr/bin/env bash
# The test command: the whole suite (tiny random models of every family + a few SmolLM2 integration tests).
set -uo pipefail
cd "$(dirname "$0")/.."
# The package's layers and the absence of import cycles (contracts in pyproject.toml).
lint-imports --no-cache || exit 1
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no tests: treat that as a failure, never as a pass.
if [ "$rc" -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi
exit "$rc"
