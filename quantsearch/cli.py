"""The ``quantsearch`` command: study, trials, validate, report, export.

A user error (a bad space file, an unknown task, missing data, a study that does not exist)
prints ``quantsearch: error: <message>`` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import optuna

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _UserError(Exception):
    """A message for the user, without traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like every other user error: one line."""

    def error(self, message: str) -> NoReturn:
        # One prefix for every user error, whichever command's parser found it.
        print(f"quantsearch: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _user_errors() -> tuple[type[BaseException], ...]:
    from quantsearch._paths import FolderError
    from quantsearch.pipeline import ArtifactError, FloatModelError
    from quantsearch.quantization import ConfigError
    from quantsearch.search import (
        SensitivityError,
        SpaceError,
        StorageError,
        StudyBusyError,
        StudyNotFoundError,
    )
    from quantsearch.tasks import TaskError

    errors: list[type[BaseException]] = [
        _UserError,
        SpaceError,
        ConfigError,
        TaskError,
        StorageError,
        StudyBusyError,
        StudyNotFoundError,
        FloatModelError,
        ArtifactError,
        FolderError,
        SensitivityError,
    ]
    try:
        from quantsearch.report import ReportError
    except ImportError:
        pass
    else:
        errors.append(ReportError)
    from quantsearch.export import ExportError

    errors.append(ExportError)
    return tuple(errors)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def _devices(text: str) -> list[str]:
    from quantsearch.tasks import resolve_device

    devices = [item.strip() for item in text.split(",") if item.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("give at least one device, e.g. cuda:0,cuda:1")
    for device in devices:
        if device != "cpu" and not re.fullmatch(r"cuda:\d+", device):
            raise argparse.ArgumentTypeError(f"{device!r} is not cpu or cuda:N")
        try:
            resolved = resolve_device(device)
        except (ValueError, RuntimeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        import torch

        if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{device}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    return devices


def _add_study_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", type=Path, help="the search-space YAML file of the study")
    parser.add_argument(
        "--storage",
        help="the study's database: a SQLite file path or an RDB URL "
        "(default: the space's storage)",
    )
    parser.add_argument(
        "--study", dest="study_name", help="the study's name, with --storage and without --space"
    )


def _build_parser() -> argparse.ArgumentParser:
    from quantsearch import __version__
    from quantsearch.export import DEFAULT_FORMAT, EXPORT_FORMATS, describe_formats

    parser = _ArgumentParser(
        prog="quantsearch",
        description="Quantize PyTorch models with NNI-style quantizers and search their "
        "settings for the best accuracy/size trade-off.",
    )
    parser.add_argument("--version", action="version", version=f"quantsearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    study = commands.add_parser(
        "study",
        help="run or resume a search study",
        description="Run the study of a search space until it holds the space's n_trials "
        "trials; running the same command again resumes it.",
    )
    study.add_argument("--space", type=Path, required=True, help="the search-space YAML file")
    study.add_argument("--storage", help="override the space's storage (file path or RDB URL)")
    study.add_argument("--n-trials", type=_positive_int, help="override the space's n_trials")
    study.add_argument(
        "--jobs", type=_positive_int, default=1, help="trials trained at once (processes)"
    )
    study.add_argument(
        "--devices",
        type=_devices,
        help="comma-separated devices the --jobs workers train on in turn (cpu, cuda:N; "
        "default: one GPU each when train.device is cuda or auto and there are several)",
    )
    study.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads per job (default: the space's train.num_threads, else for one job "
        "this process's setting, for several cores / jobs)",
    )
    study.add_argument(
        "--quiet", action="store_true", help="no progress bar: one log line per trial"
    )
    study.add_argument(
        "--report-dir", type=Path, help="where the report goes (default: reports/<study name>)"
    )
    study.add_argument("--no-report", action="store_true", help="do not write the report")
    _add_data_dir(study)
    _add_artifacts(study)

    trials = commands.add_parser("trials", help="a study's trials as a table")
    _add_study_source(trials)

    validate = commands.add_parser("validate", help="check a search-space file without running")
    validate.add_argument("--space", type=Path, required=True, help="the search-space YAML file")
    _add_data_dir(validate)

    report = commands.add_parser("report", help="write a study's report (plots, tables)")
    _add_study_source(report)
    report.add_argument("--out", type=Path, help="folder (default: reports/<study name>)")

    sensitivity = commands.add_parser(
        "sensitivity",
        help="measure (once) and print each per-layer bit width's sensitivity",
        description="Measure each per-layer bits parameter of a space on the study's float "
        "model (stored in the study; run again, it is read back) and print the table.",
    )
    sensitivity.add_argument("--space", type=Path, required=True, help="the search-space file")
    sensitivity.add_argument("--storage", help="override the space's storage")
    sensitivity.add_argument("--threads", type=_positive_int, help="torch threads")
    sensitivity.add_argument(
        "--jobs", type=_positive_int, default=1, help="measurements run at once (processes)"
    )
    _add_data_dir(sensitivity)
    _add_artifacts(sensitivity)

    export = commands.add_parser("export", help="export a trial's quantized model")
    _add_study_source(export)
    export.add_argument("--trial", type=int, required=True, help="the trial number")
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    _add_data_dir(export)
    _add_artifacts(export)
    export.add_argument(
        "--format", choices=tuple(EXPORT_FORMATS), default=DEFAULT_FORMAT, help=describe_formats()
    )
    return parser


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", help="the task's data folder, instead of the space's task.data_dir"
    )


def _add_artifacts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifacts",
        metavar="LOCATION",
        help="the artifact store every machine shares: a folder or s3://bucket/prefix "
        "(instead of the space's artifacts, or the one the study recorded)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "study": _cmd_study,
        "trials": _cmd_trials,
        "validate": _cmd_validate,
        "report": _cmd_report,
        "export": _cmd_export,
        "sensitivity": _cmd_sensitivity,
    }
    try:
        return handlers[args.command](args)
    except SystemExit as stop:
        # A task (user code) that calls sys.exit must not end the study as if it had finished.
        print(
            f"quantsearch: error: the task's code called sys.exit({stop.code!r}); the study "
            "stopped there (its unfinished trials were queued again)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "quantsearch: interrupted; unfinished trials were queued again: run the same "
            "command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except _user_errors() as error:
        print(f"quantsearch: error: {_mask(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _mask(text: str) -> str:
    from quantsearch.pipeline import mask_text

    return mask_text(text)


def _command_line() -> str:
    """This command as typed (shell-quoted), any password in it masked."""
    return _mask("quantsearch " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def _load_spec(args: argparse.Namespace) -> Any:
    from quantsearch.search import load_space

    spec = load_space(args.space)
    return spec.with_overrides(
        storage=getattr(args, "storage", None),
        n_trials=getattr(args, "n_trials", None),
        data_dir=getattr(args, "data_dir", None),
        artifacts=getattr(args, "artifacts", None),
    )


def _output_folder(path: Path, option: str) -> Path:
    """A folder to write into: refused up front when it cannot be created or written."""
    from quantsearch._paths import check_writable_folder

    check_writable_folder(path, option)
    return path


def _default_folder(study_name: str, option: str) -> Path:
    """``reports/<study name>``, for a name that can be a folder's (else: give ``option``)."""
    from quantsearch.search import SpaceError, check_study_name

    try:
        check_study_name(study_name, key="--study")
    except SpaceError as error:
        raise _UserError(f"{error}; give the folder with {option}") from None
    return Path("reports") / study_name


def _raise_on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def _cmd_study(args: argparse.Namespace) -> int:
    import torch

    from quantsearch._malloc import keep_freed_memory
    from quantsearch.search import (
        ConsoleProgress,
        available_cores,
        front_lines,
        prepare,
        run_study,
        study_banner,
        study_threads,
        target_line,
    )

    spec = _load_spec(args)
    report_dir = args.report_dir or Path("reports") / spec.study_name
    if not args.no_report:
        _output_folder(report_dir, "--report-dir")  # known now, not after the whole study
    if args.jobs > 1:
        # The study's own process only samples and records: the workers get the cores.
        torch.set_num_threads(1)
    context = prepare(spec)
    keep_freed_memory()  # trials train in this process (or its workers, which do the same)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # A shell starts background jobs with SIGINT ignored: `kill -INT` must still stop the study.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = ConsoleProgress(quiet=args.quiet)
    threads = study_threads(spec, args.jobs, args.threads)
    print(
        study_banner(spec, jobs=args.jobs, threads=threads, cores=available_cores()), flush=True
    )
    study = run_study(
        context, jobs=args.jobs, threads=args.threads, devices=args.devices, progress=progress
    )
    print("\n".join(front_lines(study)))
    target = target_line(study)
    if target is not None:
        print(target)
    if not args.no_report:
        _write_report(study, report_dir, args)
    return 0


def _write_report(study: optuna.Study, out_dir: Path, args: argparse.Namespace) -> None:
    try:
        from quantsearch.report import ReportError, write_report
    except ImportError:
        print("(no report: the quantsearch.report package is not available)", file=sys.stderr)
        return
    try:
        path = write_report(
            study, out_dir, command=_command_line(), study_args=_study_args(args)
        )
    except ReportError as error:
        print(f"quantsearch: no report: {error}", file=sys.stderr)
        return
    print(f"report: {path}")


def _study_args(args: argparse.Namespace) -> str:
    """The arguments naming this study, shell-quoted, any password masked."""
    if args.space is None:
        words = ["--storage", args.storage, "--study", args.study_name]
    else:
        storage = getattr(args, "storage", None)
        words = ["--space", str(args.space), *(["--storage", storage] if storage else [])]
    return _mask(" ".join(shlex.quote(w) for w in words))


def _open_study(args: argparse.Namespace) -> tuple[optuna.Study, str]:
    """The study named by --space (and --storage), or by --storage and --study."""
    from quantsearch.search import load_study, load_study_from, storage_url

    if args.space is not None:
        if args.study_name is not None:
            raise _UserError("give --space, or --storage with --study, not both")
        spec = _load_spec(args)
        return load_study(spec), spec.study_name
    if args.storage is None or args.study_name is None:
        raise _UserError("name the study with --space FILE, or with --storage URL --study NAME")
    return load_study_from(storage_url(args.storage), args.study_name), args.study_name


def _cmd_trials(args: argparse.Namespace) -> int:
    from quantsearch.search import trials_lines

    study, _ = _open_study(args)
    print("\n".join(trials_lines(study)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from quantsearch.search import prepare, validation_lines

    spec = _load_spec(args)
    context = prepare(spec)
    print("\n".join(validation_lines(args.space, spec, context)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        from quantsearch.report import write_report
    except ImportError:
        raise _UserError("the quantsearch.report package is not available") from None
    study, name = _open_study(args)
    out = _output_folder(args.out or _default_folder(name, "--out"), "--out")
    path = write_report(study, out, command=_command_line(), study_args=_study_args(args))
    print(f"report: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from quantsearch.export import describe_export, export_trial, task_from_study

    study, _ = _open_study(args)
    out = _output_folder(args.out, "--out")
    task = task_from_study(study, data_dir=args.data_dir) if args.data_dir else None
    result = export_trial(
        study, args.trial, out, task=task, format=args.format, artifacts=args.artifacts
    )
    print(describe_export(result))
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from quantsearch.search import ConsoleProgress, prepare, sensitivity_lines, study_sensitivity

    spec = _load_spec(args)
    context = prepare(spec)
    progress = ConsoleProgress()
    try:
        sensitivity = study_sensitivity(
            context, threads=args.threads, jobs=args.jobs, progress=progress
        )
    finally:
        progress.close()
    print("\n".join(sensitivity_lines(spec.study_name, sensitivity)))
    return 0
