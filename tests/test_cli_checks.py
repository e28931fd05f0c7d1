"""The CLI refuses what it can before any model is loaded, and a one-shot `run` does not trip
over another process's metrics port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from linewatch.cli import main
from linewatch.synthetic.demo import write_demo_clip

from helpers import error_line

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]
DEFAULT_METRICS_PORT = 9400


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_demo_clip(tmp_path_factory.mktemp("clip"), seconds=1, fps=5, size=(160, 96), references=3)


@contextlib.contextmanager
def held(port: int):
    """A real listening socket on ``port`` (if another process already holds it, that is the
    same situation: the port is taken)."""
    with socket.socket() as sock:
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
        yield


def test_run_takes_a_free_port_when_the_default_one_is_taken(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LINEWATCH_OPS__PORT")  # the tests' any-free-port: here the default is the point
    with held(DEFAULT_METRICS_PORT):
        code = main(["run", str(clip.video), "--out", str(tmp_path / "out"), "--threshold", "0", *TINY])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"port {DEFAULT_METRICS_PORT} is taken" in err and "metrics and health on http://127.0.0.1:" in err


def test_run_refuses_a_taken_port_it_was_asked_for(clip, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", str(clip.video), "--out", str(tmp_path / "out"), "--metrics-port", str(port), *TINY])
    assert code == 2
    assert f"cannot serve metrics and health on 127.0.0.1:{port}" in error_line(capsys)


def test_the_report_names_its_streams_and_span_and_reads_reviews_as_words(clip, tmp_path, capsys):
    from linewatch.console.store import ConsoleStore

    out = tmp_path / "out"
    assert main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--scores", str(out / "scores.jsonl"), "--metrics-port", "off", *TINY]) == 0
    [event] = {json.loads(line)["event_id"] for line in (out / "alerts.jsonl").read_text().splitlines()}
    ConsoleStore(out / "archive" / "index.sqlite").review(event, "false_alarm", "")
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    first, last = (json.loads(line)["time"] for line in (out / "scores.jsonl").read_text().splitlines()[::clip.frame_count - 1])
    title = re.search(r"<title>(.*)</title>", page).group(1)
    assert title == f"linewatch report: drone-1, {first[:10]} {first[11:19]} to {last[11:19]} UTC", title
    assert "<td>false alarm</td>" in page and "false_alarm" not in page


def run_command_and_list_heavy_imports(argv: list[str], env: dict) -> tuple[int, str, list[str]]:
    """Run the command in a fresh interpreter; report its exit code, stderr and which of torch /
    open_clip it had imported by the end (none: it failed before any model code loaded)."""
    code = ("import sys, contextlib, io\nfrom linewatch.cli import main\nerr = io.StringIO()\n"
            "with contextlib.redirect_stderr(err):\n    rc = main(sys.argv[1:])\n"
            "print(rc)\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip'}))\n"
            "print(err.getvalue(), end='')\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    rc, heavy, *err = result.stdout.splitlines()
    return int(rc), "\n".join(err), eval(heavy)


@pytest.mark.parametrize("command", [
    ["run", "{clip}", "--references", "{refs}", "--option", "text_weight=abc"],
    ["run", "{clip}", "--method", "bag-clip", "--option", "neighbours=1"],
    ["eval", "--data", "{refs}", "--option", "sigma=-1"],
])
def test_a_bad_option_fails_before_any_model_code_is_imported(command, clip, tmp_path):
    argv = [part.format(clip=clip.video, refs=clip.references[0].parent) for part in command]
    rc, err, heavy = run_command_and_list_heavy_imports(argv, dict(os.environ))
    assert rc == 2 and heavy == [], (err, heavy)
    assert err.startswith("linewatch: error: ") and len(err.splitlines()) == 1 and "must be" in err, err


@pytest.mark.parametrize("command", [
    ["run", "{clip}", "--option", "text_weight=abc"],  # the default method's option
    ["run", "{clip}", "--method", "winclip", "--option", "sigma=1"],  # an option the method lacks
    ["run", "{clip}", "--method", "nosuch", "--option", "sigma=1"],
])
def test_a_bad_option_flag_fails_before_the_settings_load(command, clip, monkeypatch, capsys):
    """Loading the settings takes a second or more: a typo in --option is caught before."""
    import linewatch.pipeline.settings as settings_module

    def never(*args, **kwargs):
        raise AssertionError("the settings were loaded before the --option flags were checked")

    monkeypatch.setattr(settings_module, "load_settings", never)
    assert main([part.format(clip=clip.video) for part in command]) == 2
    assert error_line(capsys)


def test_every_method_s_options_are_in_the_torch_free_table():
    from linewatch.scoring.methods import METHODS
    from linewatch.scoring.methods.coreclip import FUSIONS, LOSS_WEIGHTS
    from linewatch.scoring.methods.coreclip.model import BRANCHES
    from linewatch.scoring.options import CORECLIP_BRANCHES, CORECLIP_FUSIONS, CORECLIP_LOSSES, OPTIONS

    assert set(OPTIONS) == set(METHODS)
    for name, cls in METHODS.items():
        assert cls.Options is OPTIONS[name], name  # the CLI's early check is the constructor's
    assert (CORECLIP_BRANCHES, CORECLIP_FUSIONS, set(CORECLIP_LOSSES)) == (BRANCHES, FUSIONS, set(LOSS_WEIGHTS))


def offline_env(tmp_path) -> dict:
    """No cached weights, and a hub that refuses connections (a local port nobody listens on)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}


def test_a_pretrained_tag_that_needs_an_impossible_download_is_one_line_before_any_model_code(clip, tmp_path):
    rc, err, heavy = run_command_and_list_heavy_imports(
        ["run", str(clip.video), "--weights", "openai", "--metrics-port", "off"], offline_env(tmp_path))
    assert rc == 2 and heavy == [], (err, heavy)
    assert err.startswith("linewatch: error: --weights openai: the pretrained weights ViT-B-16/openai need a download")
    assert "pass --weights FILE" in err and len(err.splitlines()) == 1, err


def test_the_tag_check_lets_through_a_reachable_hub_and_cached_files(tmp_path, monkeypatch):
    from linewatch.scoring.weights import check_weights

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="need a download"):
        check_weights("ViT-B-16", "openai")
    with socket.socket() as hub:  # a hub that answers: the download is left to open_clip
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        check_weights("ViT-B-16", "openai")
    monkeypatch.setenv("HF_ENDPOINT", offline_env(tmp_path)["HF_ENDPOINT"])
    (tmp_path / "hf/hub/models--timm--vit_base_patch16_clip_224.openai").mkdir(parents=True)
    check_weights("ViT-B-16", "openai")  # maybe cached: open_clip reads the cache...
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # ...without the hub's retries
    check_weights("ViT-B-16", "none")
    check_weights("ViT-B-16", str(tmp_path / "weights.safetensors"))  # a file: its own checks, later


def test_train_eval_evaluates_as_the_method_runs_and_says_so(tmp_path, capsys):
    """With a memory bank, the trained method is evaluated with the training's shots as normal
    references (as `run --references` scores); without one, zero-shot; the header says which."""
    from helpers import make_category

    data = make_category(tmp_path, "widget", seed=11)
    train = ["train", "--method", "aprilgan", "--data", str(data), "--arch", "linewatch-tiny", "--epochs", "1",
             "--shots", "2", "--views", "1", "--eval", str(data)]
    assert main([*train, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert "2-shot (the training's shots as references from train/good" in capsys.readouterr().out
    assert main([*train, "--out", str(tmp_path / "b.safetensors"), "--eval-shots", "0"]) == 0
    assert "0-shot (--eval-shots)" in capsys.readouterr().out
    assert main([*train, "--out", str(tmp_path / "c.safetensors"), "--option", "memory_bank=false"]) == 0
    assert "0-shot (no memory bank: zero-shot, as it runs)" in capsys.readouterr().out
    assert main([*train, "--out", str(tmp_path / "d.safetensors"), "--option", "memory_bank=false",
                 "--eval-shots", "2"]) == 2
    assert "trained without a memory bank" in error_line(capsys)
    assert not (tmp_path / "d.safetensors").exists()  # refused before training


def test_a_reader_that_stops_early_gets_no_error_line():
    """`linewatch methods | head -1`: the pipe closes; linewatch stops quietly (exit 0, nothing on stderr)."""
    proc = subprocess.run(f"'{sys.executable}' -m linewatch methods --presets | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("spelling, name", [
    ("AA-CLIP", "aa-clip"), ("aaclip", "aa-clip"), ("CoRe-CLIP", "core-clip"), ("coreclip", "core-clip"),
    ("bag_clip", "bag-clip"), ("KAnoCLIP", "kanoclip"), ("kano-clip", "kanoclip"), ("mad-clip", "madclip"),
    ("April-GAN", "aprilgan"), ("win-clip", "winclip"), ("aprilgan", "aprilgan"),
])
def test_a_bundled_method_is_found_in_any_spelling(spelling, name, capsys):
    """The names follow the papers' spellings (AA-CLIP, KAnoCLIP), so any spelling finds them:
    in the CLI, in a profile and in the registry; checkpoints and presets keep the registered name."""
    from linewatch.cli import main
    from linewatch.scoring.methods import method_class
    from linewatch.scoring.options import canonical_method
    from linewatch.workers.profiles import StreamProfile

    assert canonical_method(spelling) == name
    assert StreamProfile(method=spelling).method == name
    assert method_class(spelling).name == name
    assert main(["methods", spelling]) in (0, None)
    assert capsys.readouterr().out.startswith(f"{name}: ")


def test_an_unknown_method_is_still_named_with_the_list():
    from linewatch.scoring.options import canonical_method, check_options

    assert canonical_method("patchcore") == "patchcore"
    with pytest.raises(ValueError, match="unknown method 'patchcore'; available: aa-clip, aprilgan"):
        check_options("patchcore", {})
