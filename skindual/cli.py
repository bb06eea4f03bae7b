"""One dataclass config per job; its command line is derived from it.

Each field becomes a flag (`per_class` → `--per-class`); the field's type gives
the parser, its default the default, and its `help` metadata the help text.
`__post_init__` of the config validates values and raises `UserError`, so a bad
flag gets one clear line and exit status 2 from `run_job`, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import os
import re
import select
import signal
import sys
import threading
import typing
from typing import Any, Callable, TypeVar

from skindual.errors import UserError, user_error_in

C = TypeVar("C")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (and, through `choices=`, its allowed values)."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(cfg: Any, at_least_one: tuple[str, ...] = ()) -> None:
    """The checks job configs share, also when built in code rather than from flags: each field in
    `at_least_one` is ≥ 1, and each field declared with ``choices=`` holds one of them."""
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(cfg, f.name) not in choices:
            raise UserError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: choose one of "
                            f"{', '.join(map(str, choices))}")


def _parser_for(tp: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(value parser, is_bool) for a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parser_for(args[0]) if len(args) == 1 else (str, False)
    if tp is bool:
        return None, True
    if tp in (int, float, str):
        return tp, False
    return str, False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the job's docstring (its usage examples) kept as written."""


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parse, is_bool = _parser_for(hints[f.name])
        help_text = f.metadata.get("help", "")
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=parse, default=default, help=help_text, choices=f.metadata.get("choices"),
                                metavar=f.metadata.get("metavar"))
    return parser


VERBOSE_ENV = "SKINDUAL_VERBOSE"
"""Set (to 1) by a job's --verbose: Ray's and the model libraries' own logs and progress bars are shown."""


def parse_config(config_cls: type[C], argv: list[str] | None, description: str) -> C:
    parser = build_parser(config_cls, description)
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and the model libraries' own logs "
                                                                "and progress bars (SKINDUAL_VERBOSE=1)")
    args = vars(parser.parse_args(argv))
    if args.pop("verbose"):
        os.environ[VERBOSE_ENV] = "1"
    return config_cls(**args)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


QUIETED = ("diffusers.utils.logging", "transformers.utils.logging")
"""The model libraries' logging modules `quiet_libraries` turns down (their verbosity and progress bars)."""


def _quiet(module: Any) -> None:
    module.set_verbosity_error()
    module.disable_progress_bar()


class _QuietOnImport:
    """A `sys.meta_path` finder that turns a library's logging down as the library is imported, so a process
    that never loads a model (an evaluation's feature actor or downstream task) never pays for importing one
    just to quiet it (diffusers: about 3 s)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in QUIETED:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def run(module: Any) -> None:
            exec_module(module)
            _quiet(module)

        spec.loader.exec_module = run  # type: ignore[method-assign]
        return spec


def quiet_libraries() -> None:
    """Keep diffusers', transformers' and the Hugging Face Hub's progress bars and advisories (weights loading,
    shards written, the LoRA loader's notes) out of a job's output unless --verbose; called by the jobs and
    by every Ray worker (`worker_setup`), whose output Ray forwards to the job's.  A library not imported yet is
    quieted when it is (`_QuietOnImport`), not imported for it."""
    if verbose():
        return
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    for name in QUIETED:
        if name in sys.modules:
            _quiet(sys.modules[name])
    if not any(isinstance(finder, _QuietOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietOnImport())
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # (imported later, it reads HF_HUB_DISABLE_PROGRESS_BARS)


REQUEST_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
"""Loggers that write each request's headers at DEBUG, signatures and session tokens among them."""


def quiet_request_loggers() -> None:
    """Keep the AWS SDK's and urllib3's loggers at WARNING or above, whatever the root logger's level
    (``SKINDUAL_LOG_LEVEL=DEBUG``): at DEBUG they log the signed headers of every S3 request (the access
    key id, the signature, ``X-Amz-Security-Token``), which must never reach a job's output or logs."""
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OUR_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ skindual"
"""How a line logged by skindual's code starts, in a job and in its Ray workers (`worker_setup`): the job shows
those of its workers' forwarded output and keeps the rest (Ray's own) in the logs, unless --verbose."""


def worker_setup() -> None:
    """In a Ray task, actor or training worker: the model libraries quiet (`quiet_libraries`), and skindual's
    log lines in the jobs' own format, which the job forwards (`cluster.init_ray`); the S3 requests' loggers
    quiet (`quiet_request_loggers`)."""
    quiet_libraries()
    quiet_request_loggers()
    logger = logging.getLogger("skindual")
    if not any(getattr(h, "skindual", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.skindual = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("SKINDUAL_LOG_LEVEL", "INFO"))
        logger.propagate = False


RAY_DATA_RESTART_NOTE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*' and ID: '\w+' has "
                                   rb"constructor arguments in the object store and max_restarts > 0")
"""The line Ray's core worker prints (at error level, on the driver's stderr, and into its log file) when a Ray Data
actor pool starts: Ray Data itself passes its pool's settings to the actors through the object store, whatever the
pool's own arguments (ray-project/ray#57733), and the driver that owns them outlives the actors."""


def drop_native_lines(pattern: re.Pattern[bytes]) -> Callable[[], None]:
    """Pass this process's standard error (file descriptor 2: what Python and native libraries write) through a
    thread that drops the lines `pattern` finds, for lines a library writes there that no setting silences;
    returns the function that puts the original standard error back (also run at exit), after the lines
    written so far.  A line without its newline goes out once nothing follows it for 50 ms; when the terminal
    cannot be written, the original standard error is put back, so no writer ever waits on the pipe."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    ours = os.fstat(2).st_ino
    stop = threading.Event()

    def put_back() -> None:  # unless someone else (a test's capture, say) has put another file there since
        if os.fstat(2).st_ino == ours:
            os.dup2(terminal, 2)

    def out(data: bytes) -> None:
        while data:
            data = data[os.write(terminal, data):]

    def pump() -> None:
        pending = b""
        try:
            while True:
                if not select.select([read], [], [], 0.05)[0]:  # idle: a partial line goes out, a stop ends
                    out(pending)
                    pending = b""
                    if stop.is_set():
                        return
                    continue
                chunk = os.read(read, 1 << 16)
                if not chunk:
                    out(pending)
                    return
                *lines, pending = (pending + chunk).split(b"\n")
                out(b"".join(line + b"\n" for line in lines if not pattern.search(line)))
        except OSError:
            put_back()
        finally:
            os.close(read)

    thread = threading.Thread(target=pump, name="skindual-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        if stop.is_set():
            return
        sys.stderr.flush()
        put_back()  # this process's end of the pipe closes: what is in it still goes out, then the pump ends
        stop.set()
        thread.join(timeout=30)  # returns as soon as the pipe is drained; longer only under a heavy load

    atexit.register(restore)
    _RESTORE_STDERR.append(restore)
    return restore


_RESTORE_STDERR: list[Callable[[], None]] = []
"""The `drop_native_lines` filters in place, each undone by `stderr_direct`."""


def stderr_direct() -> None:
    """Put this process's own standard error back (what the `drop_native_lines` filters hold goes out first), so
    that a job's last line, its error, reaches it from the main thread, not through a filter's thread."""
    while _RESTORE_STDERR:
        _RESTORE_STDERR.pop()()


class Progress:
    """Line-based progress of `total` units of `what` (``pairs``, ``steps``): done of total, rate and ETA, a line
    at least every `every` seconds while work goes on (a timer, `start`) and one at `close`; the same in a
    terminal, under ``ray job submit`` and in a log file.  `count` reports how many are done (thread-safe)."""

    def __init__(self, label: str, total: int, what: str, count: Callable[[], int], every: float = 30.0,
                 emit: Callable[[str], None] | None = None):
        import threading

        self.label, self.total, self.what, self.count, self.every = label, total, what, count, every
        self.emit = emit or logging.getLogger("skindual").info
        self.started, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def line(self) -> str:
        import time

        done = min(self.count(), self.total)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {_duration((self.total - done) / rate)}" if rate > 0 and done < self.total else (
            "done" if done >= self.total else "ETA unknown")
        share = 100 * done / self.total if self.total else 100.0
        return (f"{self.label}: {done:,}/{self.total:,} {self.what} ({share:.0f}%), {rate:.2f} {self.what}/s, "
                f"{eta}, {_duration(elapsed)} elapsed")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.emit(self.line())

    def start(self) -> Progress:
        import time

        self.started = time.monotonic()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.emit(self.line())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else (
        f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s")


_SIGINT = threading.Event()


def _on_sigint(signum, frame) -> None:
    _SIGINT.set()
    raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise `KeyboardInterrupt` if Ctrl-C came and was lost.  A Ctrl-C during generate's setup once vanished
    (the run went on to its end, status 0), most likely inside Ray's core worker, which checks for signals
    in its blocking calls (putting objects, creating actors) and turns the `KeyboardInterrupt` raised there
    into a status; `run_job`'s handler records every one, the stages call this where they can stop (generate
    before and between shards, the fine-tune and the QC segmenter before training, evaluate before each
    phase and before it writes its report), and `run_job` after the job: a Ctrl-C never ends in status 0."""
    if _SIGINT.is_set():
        raise KeyboardInterrupt


def run_job(main: Callable[[C], Any], config_cls: type[C], description: str, argv: list[str] | None = None) -> int:
    """Parse the config, run `main(config)`; a `UserError` (also one raised on a Ray worker) becomes one line on
    stderr and exit status 2, Ctrl-C one line and exit status 130."""
    logging.basicConfig(level=os.environ.get("SKINDUAL_LOG_LEVEL", "INFO"), format=LOG_FORMAT)
    quiet_request_loggers()
    _SIGINT.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main_thread else None
    try:
        config = parse_config(config_cls, argv, description)
        quiet_libraries()
        main(config)
        check_interrupt()  # swallowed where no stage checked: the run may be whole, but it does not say so
    except KeyboardInterrupt:
        stderr_direct()
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user's mistake is one line, wherever it was raised; the rest re-raises
        err = user_error_in(exc)
        if err is None:
            raise
        stderr_direct()
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return 0

