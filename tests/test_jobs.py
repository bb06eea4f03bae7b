"""The jobs' help texts are true: every flag a job's docstring names in a usage line (``python jobs/<job>.py ...``,
its own or another job's) is a flag of that job, and every flag its prose names is a flag of some job.  A mistake
is one line before Ray starts, and the line Ray prints on every Ray Data actor pool stays off a job's terminal."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.py"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
JOB_CALL = re.compile(r"python jobs/(\w+)\.py")
ANY_JOB = "any job"


def job_flags(path: Path) -> set[str]:
    """The flags of a job: those of its config class's parser, and argparse's own --help."""
    from skindual.cli import build_parser

    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    (config,) = {obj for obj in vars(module).values() if isinstance(obj, type) and obj.__name__.endswith("Config")
                 and obj.__module__ in (module.__name__, *(m for m in sys.modules if m.startswith("skindual")))
                 and f"run_job(main, {obj.__name__}" in path.read_text()}
    parser = build_parser(config, "")
    return {option for action in parser._actions for option in action.option_strings}


def named_flags(path: Path) -> list[tuple[str, str]]:
    """(job, flag) for every flag the docstring names: in a usage line of ``python jobs/<job>.py`` (continued
    with a backslash), that job's; in prose, `ANY_JOB`'s."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    found, current = [], None
    for line in doc.splitlines():
        call = JOB_CALL.search(line)
        if call:
            current = call.group(1)
            line = line[call.end():]
        for flag in FLAG.findall(line.split("#")[0]):
            found.append((current or ANY_JOB, flag))
        if not line.rstrip().endswith("\\"):
            current = None
    return found


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_flag_a_jobs_docstring_names_exists(path):
    flags = {p.stem: job_flags(p) for p in JOBS}
    flags[ANY_JOB] = set().union(*flags.values())
    missing = [f"{job}: {flag}" for job, flag in named_flags(path) if flag not in flags.get(job, set())]
    assert not missing, f"{path.name} names flags its jobs do not have: {missing}"


def test_the_check_sees_a_flag_that_does_not_exist(tmp_path):
    job = tmp_path / "finetune.py"
    job.write_text('"""Fine-tune.\n\n    python jobs/finetune.py --training-table x.parquet \\\n'
                   '        --no-such-flag 1\n    python jobs/generate.py --per-class 3\n\nSee --lr.\n"""\n')
    assert named_flags(job) == [("finetune", "--training-table"), ("finetune", "--no-such-flag"),
                                ("generate", "--per-class"), (ANY_JOB, "--lr")]
    assert "--training-table" not in job_flags(ROOT / "jobs" / "finetune.py")


# --------------------------------------------------------------------------- mistakes come back before Ray starts

@pytest.fixture(scope="module")
def outputs(tmp_path_factory, eval_world):
    """A finished-looking generation output and fine-tuning run folder, for reruns with other settings."""
    import json

    from skindual.finetune import plan_finetune
    from skindual.finetune_config import RUN_FILE, FinetuneConfig

    root = tmp_path_factory.mktemp("outputs")
    (root / "a-file").write_text("not a folder")
    # the run.json a fine-tune of the defaults writes when it starts (run_finetune)
    plan = plan_finetune(FinetuneConfig(training_data=eval_world["real"], output=str(root / "runs"), name="r"))
    (root / "runs" / "r").mkdir(parents=True)
    (root / "runs" / "r" / RUN_FILE).write_text(json.dumps({"fingerprint": plan.fingerprint, "settings": plan.settings}))
    return root


MISTAKES = {
    "finetune: a missing --training-data": (
        "finetune", lambda w, o: ["--training-data", str(o / "missing"), "--output", str(o / "runs")],
        "--training-data {o}/missing: no such folder"),
    "finetune: an --output that is a file": (
        "finetune", lambda w, o: ["--training-data", w["real"], "--output", str(o / "a-file")],
        "--output {o}/a-file is a file, not a folder"),
    "finetune: a rerun of a run with another --lr": (
        "finetune", lambda w, o: ["--training-data", w["real"], "--output", str(o / "runs"), "--name", "r",
                                  "--lr", "0.001"],
        "run r at {o}/runs was started with --lr 0.0001, now --lr 0.001"),
    "generate: --per-class naming a class twice": (
        "generate", lambda w, o: ["--per-class", "mel=3,mel=4", "--output", str(o / "g")],
        "--per-class 'mel=3,mel=4': mel is given twice"),
    "generate: an --output that is a file": (
        "generate", lambda w, o: ["--per-class", "1", "--output", str(o / "a-file")],
        "--output {o}/a-file is a file, not a folder"),
    "evaluate: --real and --synthetic swapped": (
        "evaluate", lambda w, o: ["--real", w["synthetic"], "--synthetic", w["real"], "--output", str(o / "e")],
        "--synthetic {real}: a prepared real dataset (its pairs have splits)"),
    "evaluate: a typo in --real, before any word on Inception's weights": (
        "evaluate", lambda w, o: ["--real", w["real"] + "x", "--synthetic", w["synthetic"], "--output", str(o / "e")],
        "--real {real}x: no such folder"),
    "export: a --with-real that is not there": (
        "export", lambda w, o: ["--synthetic", w["synthetic"], "--with-real", str(o / "real"), "--output", str(o / "x")],
        "--with-real {o}/real: no committed shards"),
}


@pytest.mark.slow  # a job process each: about 8 s to import torch, diffusers and Ray
@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_mistake_is_one_line_before_ray_starts(case, eval_world, outputs):
    """RAY_ADDRESS points where no cluster is: a job that tried to start or reach Ray would fail another way."""
    from job_runs import error_line, run_job

    job, args, expected = MISTAKES[case]
    result = run_job(job, args(eval_world, outputs), "127.0.0.1:1", timeout=120)
    line = error_line(result)
    assert line.startswith("error: " + expected.format(o=outputs, real=eval_world["real"])), (case, line)
    assert "Inception" not in line


RAY_NOTE = ("[2026-12-06 04:19:49,796 E 17259 17259] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(ShardGenerator))' and ID: 'a5361ecdbdb54eb35f549fef01000000' has constructor "
            "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of scope "
            "or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
            "details.")
THEIR_ACTOR = RAY_NOTE.replace("MapWorker(MapBatches(ShardGenerator))", "Mine")


def test_the_line_ray_prints_on_every_actor_pool_stays_off_a_jobs_terminal():
    """`cli.drop_native_lines` as `init_ray` installs it: what the process writes to its standard error, natively
    or from Python, comes out in order and whole (a partial line too), but for Ray Data's restart note; a user's
    own actor's note stays; a child still holding the pipe does not hold up the exit."""
    import subprocess
    import time

    script = f"""
import os, subprocess, sys, time
from skindual.cli import RAY_DATA_RESTART_NOTE, drop_native_lines
drop_native_lines(RAY_DATA_RESTART_NOTE)
os.write(2, b"native line\\n")
os.write(2, {RAY_NOTE.encode()!r} + b"\\n")
print("python line", file=sys.stderr)
os.write(2, {THEIR_ACTOR.encode()!r} + b"\\n")
os.write(2, b"no newline yet")
time.sleep(0.3)
os.write(2, b", now\\n")
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"], stdout=subprocess.DEVNULL)
sys.stderr.write("last")
"""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and time.monotonic() - started < 15, run.stderr
    assert run.stderr == f"native line\npython line\n{THEIR_ACTOR}\nno newline yet, now\nlast"


QUIET_CHECK = """
import sys
from skindual.cli import quiet_libraries, worker_setup
{before}
worker_setup()
assert ("diffusers" in sys.modules) == {imported}, "worker_setup imported diffusers"
import diffusers.utils.logging as d, transformers.utils.logging as t
from huggingface_hub.utils import are_progress_bars_disabled
print(d.get_verbosity(), d.is_progress_bar_enabled(), t.get_verbosity(), t.is_progress_bar_enabled(),
      are_progress_bars_disabled())
"""


@pytest.mark.parametrize("imported", [False, True])
def test_a_worker_quiets_the_model_libraries_without_importing_them(imported):
    """A Ray worker that never loads a model (a feature actor, a downstream task) does not import diffusers to
    quiet it; one that imports it later, or did before, gets it quiet all the same."""
    import subprocess

    code = QUIET_CHECK.format(before="import diffusers" if imported else "", imported=imported)
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("SKINDUAL_VERBOSE", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["40", "False", "40", "False", "True"]  # logging.ERROR, no progress bars
