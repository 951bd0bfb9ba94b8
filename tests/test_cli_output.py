"""What the jobs print (issue 12 item 13, issue 13 item 4).

* A user's mistake - a typo'd config key, a missing input, a missing model - ends every job with exit 2 and one
  line ``error: <message>`` on stderr, never a traceback (``clcae.cli_args.job``).  In-process: the Ray-facing
  start is replaced, every one of these is found before Ray would start.
* A real job, run as a user runs it, prints a few lines: its progress, the summary, where its outputs and Ray's
  logs are; none of Ray's internals, progress-bar escapes or tracebacks (``clcae.train.runtime``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from clcae.cli_args import run_job
from clcae.errors import CLCAEError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TYPO = "loss.lpipz=0.5"  # loss.lpips, mistyped
ANSI = re.compile(r"\x1b\[")


def script(path: str) -> ModuleType:
    name = "cli_output_" + re.sub(r"\W", "_", path)
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_process_state():
    """configure_output sets logging and Ray's environment knobs for the process: undo both after each test."""
    import clcae.train.runtime as runtime

    env, root = dict(os.environ), logging.getLogger()
    handlers, level, clcae_level = root.handlers[:], root.level, logging.getLogger("clcae").level
    session, verbose, knobs = runtime._session_dir, runtime._verbose, runtime._knobs_set
    runtime._session_dir = None  # no "Ray's logs" note from a Ray another test started
    yield
    os.environ.clear()
    os.environ.update(env)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("clcae").setLevel(clcae_level)
    runtime._session_dir, runtime._verbose, runtime._knobs_set = session, verbose, knobs


# (job, case) -> arguments; "{tmp}" is the test's folder. A missing input / model where the job has one.
MISSING_DIRECTION = ["directions.up.kind=interfacegan", "directions.up.path={tmp}/nowhere_up.pt"]
CASES = {
    ("jobs/invert.py", "typo"): ["--input", "{tmp}/in", "--output", "{tmp}/out", TYPO],
    ("jobs/invert.py", "input"): ["--input", "{tmp}/nowhere", "--output", "{tmp}/out"],
    ("jobs/invert.py", "model"): ["--model", "{tmp}/nowhere.pt", "--input", "{tmp}/in", "--output", "{tmp}/out"],
    ("jobs/evaluate.py", "typo"): ["--config", TINY, "--input", "{tmp}/in", "--out", "{tmp}/out", TYPO],
    ("jobs/evaluate.py", "input"): ["--config", TINY, "--input", "{tmp}/nowhere", "--out", "{tmp}/out"],
    ("jobs/evaluate.py", "model"): ["--model", "{tmp}/nowhere.pt", "--input", "{tmp}/in", "--out", "{tmp}/out"],
    ("jobs/train.py", "typo"): ["stage=contrastive", "--run-name", "r", "train.storage_path={tmp}/runs", TYPO],
    ("jobs/train.py", "input"): ["stage=contrastive", "--run-name", "r", "train.storage_path={tmp}/runs",
                                 "data.pairs=[{tmp}/nowhere]"],
    ("jobs/train.py", "model"): ["stage=inversion", "--run-name", "r", "train.storage_path={tmp}/runs",
                                 "data.train=[{tmp}/in]", "model.use_align=false",
                                 "train.init_from={tmp}/nowhere.pt"],
    ("jobs/synthesize.py", "typo"): ["{tmp}/pairs", TYPO],
    ("jobs/directions.py", "typo"): ["ganspace", "--config", TINY, "--out", "{tmp}/pca.pt", TYPO],
    ("jobs/directions.py", "input"): ["interfacegan", "--latents", "{tmp}/nowhere", "--label-column", "smile",
                                      "--out", "{tmp}/smile.pt"],
    ("jobs/directions.py", "model"): ["ganspace", "--config", TINY, "--checkpoint", "{tmp}/nowhere.pt",
                                      "--out", "{tmp}/pca.pt"],
    ("jobs/make_shards.py", "typo"): ["{tmp}/in", "{tmp}/shards", "--config", TINY, TYPO],
    ("jobs/make_shards.py", "input"): ["{tmp}/nowhere", "{tmp}/shards"],
    ("jobs/demo.py", "typo"): ["--out", "{tmp}/demo", TYPO],
    ("serve/app.py", "typo"): [TYPO],
    ("serve/app.py", "model"): ["--model", "{tmp}/nowhere.pt"],
    ("serve/app.py", "direction"): [*MISSING_DIRECTION],
    ("jobs/invert.py", "direction"): ["--input", "{tmp}/in", "--output", "{tmp}/out", "--edit", "up=1",
                                      *MISSING_DIRECTION],  # (without --edit it loads no directions)
    ("jobs/evaluate.py", "direction"): ["--config", TINY, "--input", "{tmp}/in", "--out", "{tmp}/out",
                                        "--edit", "up=1", *MISSING_DIRECTION],
}
# what the message must name
EXPECTED = {"typo": "lpipz", "input": "nowhere", "model": "nowhere.pt", "direction": "direction 'up': direction file"}


@pytest.mark.parametrize("path,case", list(CASES), ids=[f"{p.split('/')[1][:-3]}-{c}" for p, c in CASES])
def test_a_users_mistake_is_one_error_line_and_exit_2(path, case, tmp_path, monkeypatch, capsys):
    module = script(path)
    # Ray is not started: every mistake here is found in the driver, before any Ray task or worker would run
    if hasattr(module, "init_ray"):
        monkeypatch.setattr(module, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr("clcae.train.runtime.init_ray", lambda *a, **k: None)
    if hasattr(module, "start"):  # serve/app.py: build the application (which resolves the model), serve nothing

        def build_only(cfg, page=""):
            module.build(cfg, page)
            raise AssertionError("the mistake got past build(): it would only show in a replica, Serve would "
                                 "answer 'Deploying application failed' and main would wait forever")

        monkeypatch.setattr(module, "start", build_only)
    (tmp_path / "in").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 150)).save(tmp_path / "in" / "a.png")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in CASES[path, case]]
    code = module.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"{path} {argv}: exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()  # progress lines may come first (evaluate builds its model, then reads)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert EXPECTED[case] in errors[0], errors[0]


def test_run_job_maps_interrupts_and_bugs(capsys):
    class Mistake(CLCAEError, ValueError):
        pass

    def raises(exc: BaseException):
        def main() -> int:
            raise exc

        return main

    assert run_job(raises(Mistake("bad key\n  and why"))) == 2
    assert capsys.readouterr().err == "error: bad key; and why\n"  # one line, even for a message of several
    assert run_job(raises(KeyboardInterrupt())) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert run_job(raises(ZeroDivisionError("a bug"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err  # a bug keeps its traceback
    assert run_job(lambda: None) == 0


def test_user_errors_keep_their_builtin_bases():
    from clcae.config import ConfigError
    from clcae.data.storage import StorageError
    from clcae.editing import DirectionFileError, MissingDirectionFileError
    from clcae.weights import MissingWeightsError

    assert issubclass(ConfigError, CLCAEError) and issubclass(ConfigError, ValueError)
    assert issubclass(StorageError, CLCAEError) and issubclass(StorageError, RuntimeError)
    assert issubclass(MissingDirectionFileError, DirectionFileError)
    assert issubclass(MissingDirectionFileError, FileNotFoundError)
    assert issubclass(MissingWeightsError, CLCAEError) and issubclass(MissingWeightsError, FileNotFoundError)


@pytest.mark.slow
@pytest.mark.cluster  # starts its own local Ray
def test_a_real_job_prints_a_few_lines_without_ray_internals(tmp_path):
    """jobs/invert.py on 3 tiny images, as a user runs it (a subprocess that starts its own local Ray)."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 150)).save(tmp_path / "in" / f"img_{i}.png")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    for knob in ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS"):  # the job's own settings, not ours
        env.pop(knob, None)
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "invert.py"), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "infer.actors=1"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Traceback" not in output and not ANSI.search(output), output[-5000:]
    lines = output.strip().splitlines()
    # the summary (JSON, ~15 lines), a progress line per 10 s, where Ray's logs are; Ray's own output was ~100
    assert len(lines) <= 30, f"{len(lines)} lines:\n" + output[-5000:]
    assert '"written": 3' in done.stdout
    assert any(line.startswith("Ray's logs: ") for line in done.stderr.splitlines())
    logs = done.stderr.split("Ray's logs: ", 1)[1].split()[0]
    assert Path(logs).is_dir()  # and Ray's internals are there
