"""The deploy folder as an operator meets it. scripts/check_deploy.py (run by scripts/test.sh
after this suite) must fail on a broken chart, and the compose recipe must start from
deploy/README.md's steps as written: the settings each service loads check out against the
files those steps put in ./data (bind-mounted at /data)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from linewatch.cli import build_parser, main
from linewatch.pipeline.settings import load_settings
from linewatch.pipeline.wiring import check_settings, policy_table

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_deploy.py"


def check_deploy(chart: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(CHECK), "--chart", str(chart)], capture_output=True, text=True,
                            timeout=600, check=False)
    if "skipped  helm" in result.stdout:
        pytest.skip(f"helm cannot be had here: {result.stdout}")
    return result


def broken_chart(tmp_path: Path, old: str, new: str, file: str = "values.yaml") -> Path:
    chart = tmp_path / "linewatch"
    shutil.copytree(ROOT / "deploy" / "helm" / "linewatch", chart)
    target = chart / file
    text = target.read_text()
    assert old in text, f"{old!r} not in {file}"
    target.write_text(text.replace(old, new))
    return chart


@pytest.mark.services
def test_checks_fail_on_the_yaml_1_1_key_bug(tmp_path):
    """The bug that shipped: an unquoted `n` key becomes `false` in Helm and the rendered config
    fails linewatch's loader. Here the chart's own guard is removed too, so the loader must catch it."""
    chart = broken_chart(tmp_path, '{k: 3, "n": 10, cooldown_s: 0}', "{k: 3, n: 10, cooldown_s: 0}")
    guard = chart / "templates" / "configmap.yaml"
    guard.write_text(re.sub(r"\{\{- if regexMatch .*?\{\{- end \}\}\n", "", guard.read_text(), count=1,
                            flags=re.DOTALL))
    result = check_deploy(chart)
    assert result.returncode == 1, result.stdout
    assert "FAILED   linewatch config (default values)" in result.stdout
    assert "alerts.policy.false: Extra inputs are not permitted" in result.stdout


@pytest.mark.services
def test_the_chart_refuses_a_boolean_key_itself(tmp_path):
    chart = broken_chart(tmp_path, '{k: 3, "n": 10, cooldown_s: 0}', "{k: 3, n: 10, cooldown_s: 0}")
    result = check_deploy(chart)
    assert result.returncode == 1 and "FAILED   helm template (default values)" in result.stdout
    assert "a key YAML 1.1 read as a boolean" in result.stdout  # helm 4's lint lets `fail` pass; template stops


@pytest.mark.services
def test_checks_fail_on_an_invalid_manifest_and_a_missing_probe(tmp_path):
    chart = broken_chart(tmp_path, "replicas: {{ .Values.worker.replicas }}",
                         "replicas: {{ .Values.worker.replicas | quote }}", "templates/worker.yaml")
    helpers = chart / "templates" / "_helpers.tpl"
    helpers.write_text(helpers.read_text().replace("readinessProbe:\n  httpGet: {path: /readyz, port: metrics}",
                                                   "readinessProbe:\n  httpGet: {path: /healthz, port: metrics}"))
    result = check_deploy(chart)
    assert result.returncode == 1
    assert "'2' is not of type 'integer'" in result.stdout
    assert "readinessProbe is not GET /readyz" in result.stdout


def _interpolate(text: str, env: dict) -> str:
    """Compose's ${VAR:-default} with this environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), str(text))


def test_compose_recipe_starts_from_the_readme_steps(tmp_path, monkeypatch):
    """deploy/README.md, Docker Compose, step by step (the image's `linewatch demo` run here as
    `linewatch demo`), then each linewatch service's settings as its container sees them."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    for step in ("cp linewatch.example.yaml linewatch.yaml", "mkdir -p data/videos data/references",
                 "linewatch demo /data/demo", "mv data/demo/clip.mp4 data/videos/drone-demo.mp4",
                 "cp -r data/demo/references data/references/insulator"):
        assert step in readme, f"the README's step {step!r} changed: update this test"
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(ROOT / "deploy" / "linewatch.example.yaml", deploy / "linewatch.yaml")
    (deploy / "data" / "videos").mkdir(parents=True)
    (deploy / "data" / "references").mkdir(parents=True)
    assert main(["demo", str(deploy / "data" / "demo"), "--seconds", "1", "--fps", "5"]) == 0
    (deploy / "data" / "demo" / "clip.mp4").rename(deploy / "data" / "videos" / "drone-demo.mp4")
    shutil.copytree(deploy / "data" / "demo" / "references", deploy / "data" / "references" / "insulator")

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    data = str(deploy / "data")
    # the bind mount: /data in the container is ./data here
    mounted = (deploy / "linewatch.yaml").read_text().replace("/data/", f"{data}/")
    config = deploy / "mounted.yaml"
    config.write_text(mounted)
    for name, service in compose["services"].items():
        if "linewatch" not in str(service.get("image", "")):
            continue
        env = {k: _interpolate(v, {}) for k, v in service["environment"].items()}
        for key in [k for k in os.environ if k.startswith("LINEWATCH_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        command = service.get("command") or []
        if name == "ingest":
            sources = sorted(Path(data, "videos").glob("*.mp4"))  # $INGEST_SOURCES' default glob
            assert [p.name for p in sources] == ["drone-demo.mp4"]
            command = ["ingest", "--config", "/etc/linewatch/linewatch.yaml", *map(str, sources)]
        args = build_parser().parse_args([part.replace("/etc/linewatch/linewatch.yaml", str(config))
                                          for part in command])
        settings = load_settings(args.config)
        assert settings.ops.host == "0.0.0.0", name  # probes and Prometheus reach it from outside
        if args.command == "worker":
            check_settings(settings)  # what the worker checks before building its model
        elif args.command == "sink":
            policy_table(settings)
        elif args.command == "console":  # reads the archive the archive sink writes, beyond loopback
            assert settings.console.host == "0.0.0.0" and settings.archive == "/out/archive"
