"""The ``allocpolicy`` command.

::

    allocpolicy run [--policy FILE] [--backend system|jemalloc|mimalloc] [--report-fd N]
                    [--inject SETTING] [--libs-report FILE|-] [--stats-socket] -- CMD ...
    allocpolicy libs [--policy FILE] [--output FILE|-] -- CMD ...
    allocpolicy check [FILE]
    allocpolicy stats [PID | --socket ADDRESS] [--json | --prometheus]
    allocpolicy lib
    allocpolicy --version

Exit codes: 0 success; 1 the runtime library is missing, or ``stats`` could
not read the counters it was asked for; 2 a usage or policy error; 126 the
command cannot be executed; 127 the command was not found (the last two as in
POSIX shells). After ``run`` has started the command, the exit
status and signals are the command's own: ``run`` replaces itself with it.
"""

from __future__ import annotations

__all__ = ["main", "BACKENDS"]

import argparse
import ctypes.util
import dataclasses
import fcntl
import os
import platform
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from . import _stats_client
from ._budget_checks import budget_warnings
from ._errors import PolicyError, RuntimeLoadError, did_you_mean
from ._inject import ENV_INJECT
from ._offenders import advice, found_in_environment, uncovered
from ._policy import (
    BUILTIN_SOURCE,
    ENV_POLICY,
    ENV_POLICY_TOML,
    ENV_TABLE,
    MAX_FD,
    Policy,
    default_policy,
    load_policy,
    load_policy_text,
)
from ._stats_socket import DEFAULT_ADDRESS, ENV_STATS_SOCKET

PROG = "allocpolicy"

EXIT_OK = 0
EXIT_RUNTIME_MISSING = 1
EXIT_UNAVAILABLE = 1  # `stats`: the counters asked for cannot be read
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


@dataclasses.dataclass(frozen=True)
class Backend:
    """An allocator preloaded behind the runtime."""

    soname: str  #: file looked for in the library directories
    link_name: str  #: name for ctypes.util.find_library
    package: str  #: Debian package that ships it


#: ``--backend`` choices; ``system`` is the C library's own allocator.
BACKENDS: dict[str, Backend | None] = {
    "system": None,
    "jemalloc": Backend("libjemalloc.so.2", "jemalloc", "libjemalloc2"),
    "mimalloc": Backend("libmimalloc.so.2", "mimalloc", "libmimalloc2.0"),
}


class UserError(Exception):
    """A mistake of the caller: reported as one line, never as a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _version() -> str:
    package = sys.modules.get(__package__ or "allocpolicy")
    version = getattr(package, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("allocpolicy")
        except PackageNotFoundError:
            version = "unknown"
    return f"{PROG} {version}"


def _load(path: str | None) -> Policy:
    return load_policy(path) if path is not None else default_policy()


# --- run ---------------------------------------------------------------------


def _library_dirs() -> list[str]:
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    return [
        f"/usr/lib/{triplet}",
        "/usr/lib",
        f"/lib/{triplet}",
        "/usr/local/lib",
        "/usr/lib64",
        "/lib64",
    ]


def find_backend(name: str) -> str | None:
    """Path (or soname) of a backend allocator library; ``None`` for ``system``.

    Raises:
        UserError: the library is not installed; the message names the package.
    """
    backend = BACKENDS[name]
    if backend is None:
        return None
    for directory in _library_dirs():
        candidate = Path(directory, backend.soname)
        if candidate.is_file():
            return str(candidate)
    # ldconfig's cache knows non-standard directories; the dynamic loader
    # finds a bare soname there too.
    found = ctypes.util.find_library(backend.link_name)
    if found:
        return found
    raise UserError(
        f"--backend {name} needs {backend.soname}, which is not installed; "
        f"install the Debian package {backend.package} (apt-get install {backend.package})"
    )


def _preload(ours: str, backend: str | None, previous: str) -> str:
    """LD_PRELOAD value: ours first, so that our dlsym(RTLD_NEXT) reaches the
    backend, then the backend, then what was there (without repeating ours)."""
    head = [ours] + ([backend] if backend else [])
    rest = [p for p in previous.replace(":", " ").split() if p not in head]
    return " ".join(head + rest)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError("run: no command given; usage: allocpolicy run [options] -- COMMAND [ARG ...]")
    # Read once, here: the command gets the text, so any readable source
    # works (a pipe, `<(...)`) and the command sees what was compiled.
    policy, text = load_policy_text(args.policy) if args.policy is not None else (default_policy(), None)
    if text is not None:
        _check_can_hand_over(args.policy, text)
    if args.report_fd is not None:
        policy = dataclasses.replace(
            policy, process=dataclasses.replace(policy.process, report_fd=args.report_fd)
        )
    _check_report_fd(policy, args.report_fd is not None)
    inject_text = args.inject if args.inject is not None else os.environ.get(ENV_INJECT)
    if inject_text:
        policy = _with_injection(policy, inject_text)
    table = policy.compile()
    if args.libs_report is not None:
        table += f";libreport={_libs_report_fd(args.libs_report, args.libs_report_option)}"
    backend = find_backend(args.backend)

    # Imported here so that `check` and `--help` work without the library.
    from . import _native

    library = _native.library_path()

    env = dict(os.environ)
    env["LD_PRELOAD"] = _preload(library, backend, env.get("LD_PRELOAD", ""))
    env[ENV_TABLE] = table
    env[ENV_POLICY] = os.path.abspath(args.policy) if args.policy is not None else BUILTIN_SOURCE
    if text is not None:
        env[ENV_POLICY_TOML] = text
    else:
        env.pop(ENV_POLICY_TOML, None)
    if args.stats_socket:
        env[ENV_STATS_SOCKET] = DEFAULT_ADDRESS
    if inject_text:
        # The canonical form carries the seed, so that the Python side of the
        # command applies exactly what the table holds.
        env[ENV_INJECT] = str(policy.inject)

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # exec, not a child: the exit status, signals and pid are the command's own.
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise UserError(f"command not found: {command[0]}", EXIT_NOT_FOUND) from None
    except PermissionError:
        raise UserError(_not_executable(command[0], env.get("PATH", os.defpath)), EXIT_NOT_EXECUTABLE) from None
    except OSError as exc:
        raise UserError(f"cannot execute {command[0]}: {exc.strerror or exc}", EXIT_NOT_EXECUTABLE) from None
    raise AssertionError("unreachable")  # pragma: no cover


# Linux limits one environment string (NAME=value) to 32 pages.
_ENV_STRING_MAX = 32 * 4096


def _check_can_hand_over(source: str, text: str) -> None:
    if "\0" in text:
        raise UserError(f"run: --policy {source}: the policy file contains a NUL byte")
    size = len(ENV_POLICY_TOML) + 1 + len(text.encode("utf-8")) + 1
    if size > _ENV_STRING_MAX:
        raise UserError(
            f"run: --policy {source}: the policy is {size} bytes, more than the "
            f"{_ENV_STRING_MAX // 1024} KiB that the environment can hand to the command"
        )


def _check_report_fd(policy: Policy, from_option: bool) -> None:
    """The command writes its diagnostics to the report descriptor: one that
    is not open for writing would lose the only account of an abort, so
    refuse to start. It is made inheritable, or exec would close it."""
    fd = policy.process.report_fd
    where = f"--report-fd {fd}" if from_option else f"report_fd = {fd} in {policy.source} [process]"
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise UserError(
            f"run: {where}: descriptor {fd} is not open, so diagnostics would be lost; "
            f"open it for the command (for example `{fd}>>report.log`) or choose another"
        ) from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise UserError(f"run: {where}: descriptor {fd} is open for reading only; diagnostics are written to it")
    if fd > 2:
        os.set_inheritable(fd, True)


def _not_executable(name: str, path: str) -> str:
    """Why exec of ``name`` was refused with EACCES: a directory is not a
    program, whatever its permission bits say."""
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in path.split(os.pathsep)]
    if any(os.path.isdir(c) for c in candidates) and not any(
        os.path.isfile(c) and os.access(c, os.X_OK) for c in candidates
    ):
        return f"cannot execute {name}: is a directory"
    return f"permission denied: {name}"


def _libs_report_fd(target: str, option: str) -> int:
    """Descriptor the command writes the libraries report to at exit: 2 for
    ``-``, else FILE opened here (truncated) and inherited through exec.
    ``option`` is how the user asked for it, for the error message."""
    if target == "-":
        return 2
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise UserError(f"{option} {target}: {exc.strerror or exc}") from None
    if fd > MAX_FD:
        raise UserError(f"{option} {target}: descriptor {fd} is above {MAX_FD}")
    os.set_inheritable(fd, True)
    return fd


def cmd_libs(args: argparse.Namespace) -> int:
    """``run --libs-report``: which shared objects allocate, how much, how often in vain."""
    if not [arg for arg in args.command if arg != "--"]:
        raise UserError("libs: no command given; usage: allocpolicy libs [options] -- COMMAND [ARG ...]")
    run_args = argparse.Namespace(
        command=args.command,
        policy=args.policy,
        backend=args.backend,
        report_fd=None,
        inject=None,
        libs_report=args.output,
        libs_report_option="libs: --output",
        stats_socket=False,
    )
    return cmd_run(run_args)


def _with_injection(policy: Policy, text: str) -> Policy:
    """``policy`` with the injection setting ``text`` (--inject or ALLOCPOLICY_INJECT)
    in place of its ``[inject]`` table, compiled into the table so that it
    holds from the command's first allocation, whatever the command is."""
    from ._inject import InjectSettings

    try:
        settings = InjectSettings.from_string(text)
    except ValueError as exc:
        raise UserError(f"run: injection setting {text!r}: {exc}") from None
    if settings.scope not in (None, "process") and settings.scope not in policy.scopes:
        declared = ", ".join(policy.scopes) or "none"
        raise UserError(
            f"run: injection setting {text!r}: scope {settings.scope!r} is not declared in the "
            f"policy{did_you_mean(settings.scope, policy.scopes)} (declared scopes: {declared})"
        )
    policy = dataclasses.replace(policy, inject=settings)
    if settings.probability is not None and "seed" not in text:
        print(f"{PROG}: {ENV_INJECT}={settings} (seed drawn for this run)", file=sys.stderr)
    return policy


# --- check, lib -----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    policy = _load(args.file)
    print(policy.describe())
    sys.stdout.flush()  # the warnings follow the description, also in a terminal
    for problem in budget_warnings(policy):
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    for offender, path in found_in_environment(uncovered(policy.scopes)):
        print(f"{PROG}: {advice(offender, path)}", file=sys.stderr)
    return EXIT_OK


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a process id, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a process id (a positive number), got {value}")
    return value


def cmd_stats(args: argparse.Namespace) -> int:
    if args.pid is not None and args.socket is not None:
        raise UserError("stats: give PID or --socket ADDRESS, not both")
    if args.pid is None and args.socket is None:
        print(_stats_client.listing(as_json=args.json))
        return EXIT_OK
    shape = "json" if args.json else "prometheus" if args.prometheus else "table"
    try:
        text = _stats_client.render(_stats_client.fetch(args.pid, args.socket), shape)
    except _stats_client.StatsUnavailable as exc:
        raise UserError(f"stats: {exc}", EXIT_UNAVAILABLE) from None
    print(text, end="")
    return EXIT_OK


def cmd_lib(args: argparse.Namespace) -> int:
    from . import _native

    print(_native.library_path())
    return EXIT_OK


# --- argument parsing -----------------------------------------------------------


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a file descriptor number, got {text!r}") from None
    if not 0 <= value <= MAX_FD:
        raise argparse.ArgumentTypeError(
            f"expected a file descriptor number between 0 and {MAX_FD}, got {value}"
        )
    return value


def _launch_options(parser: argparse.ArgumentParser) -> None:
    """What `run` and `libs` share: the policy and the backend."""
    parser.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in default policy)")
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="system",
        help="allocator that hands out the memory (default: system, the C library's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-scope out-of-memory policy for Python processes.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a command under the runtime (LD_PRELOAD)",
        description="Run COMMAND with the allocpolicy runtime preloaded and the policy applied.",
        usage=(
            "%(prog)s [--policy FILE] [--backend {system,jemalloc,mimalloc}] [--report-fd N] "
            "[--inject SETTING] [--libs-report FILE|-] [--stats-socket] -- COMMAND [ARG ...]"
        ),
    )
    _launch_options(run)
    run.add_argument(
        "--report-fd", metavar="N", type=_fd, help="file descriptor for diagnostics (overrides the policy)"
    )
    run.add_argument(
        "--inject",
        metavar="SETTING",
        help=f"fault injection, e.g. 'scope=task,nth=17' (overrides the policy's [inject] "
        f"and {ENV_INJECT})",
    )
    run.add_argument(
        "--libs-report",
        metavar="FILE",
        help="at exit, write which shared objects allocated, how much and how many of their "
        "allocations failed to FILE ('-': standard error)",
    )
    run.add_argument(
        "--stats-socket",
        action="store_true",
        help=f"each Python process of the command serves its stats on a Unix socket, for "
        f"`{PROG} stats PID` (sets {ENV_STATS_SOCKET})",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run, libs_report_option="run: --libs-report")

    check = sub.add_parser(
        "check",
        help="validate a policy file and show the effective policy",
        description="Validate FILE and print every setting with its effective value.",
    )
    check.add_argument(
        "file", metavar="FILE", nargs="?", help="policy file (default: the built-in default policy)"
    )
    check.set_defaults(handler=cmd_check)

    libs = sub.add_parser(
        "libs",
        help="run a command and report which shared objects allocated",
        description="Run COMMAND as `run` does and, when it exits, write which shared objects "
        "called the allocator: bytes and allocations granted, allocations that failed, and the "
        "scope each is bound to (the same as `run --libs-report`).",
        usage="%(prog)s [--policy FILE] [--backend {system,jemalloc,mimalloc}] [--output FILE|-] "
        "-- COMMAND [ARG ...]",
    )
    _launch_options(libs)
    libs.add_argument(
        "--output", "-o", metavar="FILE", default="-", help="where the table goes (default: -, standard error)"
    )
    libs.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    libs.set_defaults(handler=cmd_libs)

    stats = sub.add_parser(
        "stats",
        help="show the counters of a running process",
        description="Show the counters (allocpolicy.stats()) of process PID, which must serve them: "
        f"start it with `{PROG} run --stats-socket` or {ENV_STATS_SOCKET}=1. Without PID, list "
        "the processes that serve their stats.",
        usage="%(prog)s [PID | --socket ADDRESS] [--json | --prometheus]",
    )
    stats.add_argument("pid", metavar="PID", nargs="?", type=_pid, help="process id")
    stats.add_argument(
        "--socket",
        metavar="ADDRESS",
        help="read the stats served at ADDRESS (a path, or @NAME for an abstract socket) instead",
    )
    shape = stats.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the JSON document the process serves")
    shape.add_argument(
        "--prometheus", action="store_true", help="print the metrics in the Prometheus text format"
    )
    stats.set_defaults(handler=cmd_stats)

    lib = sub.add_parser(
        "lib",
        help="print the path of the runtime library",
        description="Print the path of the runtime library.",
    )
    lib.set_defaults(handler=cmd_lib)
    for subparser in sub.choices.values():
        subparser.set_defaults(subparser=subparser)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand's parser, with its usage: the top-level
        # usage would not say what `check` accepts.
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``allocpolicy`` command; returns the exit status."""
    args = _parse(argv)
    try:
        return args.handler(args)
    except PolicyError as exc:
        for problem in exc.problems:
            _error(str(problem))
        return EXIT_USAGE
    except RuntimeLoadError as exc:
        _error(str(exc))
        return EXIT_RUNTIME_MISSING
    except UserError as exc:
        _error(str(exc))
        return exc.code
    except BrokenPipeError:
        # `allocpolicy check x | head`: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
