"""A lease rehearsal on any machine: the GPU scripts' commands checked with the real parsers, never run.

A device lease is 30 minutes and a call's output is all it leaves; a mistyped flag, switch or pytest selection in
scripts/gpu/*.sh costs a whole call. With `HD_REHEARSE=FILE` set, those scripts record each command here instead
of running it (`record`), and `check FILE` then verifies every record in one process:
  bench   `hybrid-distill bench` arguments: the CLI's parser, then distill.bench.BenchSettings' own checks
  tests   pytest arguments: a collection that must select at least one test
  script  a Python script and its arguments: its `build_parser()` if it has one, else no arguments
and, for each, the HD_* switches set in its environment: known names with allowed values. A part name a script
does not know is recorded as a failure (`unknown_part`).

    HD_REHEARSE=/tmp/lease.jsonl bash scripts/gpu/untimed_changes.sh kl_rows
    python scripts/gpu/rehearse.py check /tmp/lease.jsonl
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# switches a lease script may set that are not the library's own kernel choices (checked below)
HARNESS_SWITCHES = ("HD_REHEARSE", "HD_FAIL_AT_STEP", "HD_BENCH_EXTRA")


def record(kind: str, args: list[str]) -> None:
    """Appends one command, with the HD_*, FLA_* and TORCHINDUCTOR_* switches of its environment, to
    $HD_REHEARSE."""
    switches = {name: value for name, value in os.environ.items()
                if name.startswith(("HD_", "FLA_", "TORCHINDUCTOR_")) and name != "HD_REHEARSE"}
    with open(os.environ["HD_REHEARSE"], "a") as records:
        records.write(json.dumps({"kind": kind, "args": args, "switches": switches}) + "\n")


@contextlib.contextmanager
def _environment(switches: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(switches)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def switch_errors(switches: dict[str, str]) -> list[str]:
    """Unknown HD_* names and values the library's own validators refuse."""
    from hybrid_distill.distill.attention_backend import sdpa_choice
    from hybrid_distill.distill.fused_kl import kl_heads_choice, kl_rows_choice, kl_teacher_rows
    from hybrid_distill.distill.merged_projections import merged_projections_choice
    from hybrid_distill.distill.teacher_ahead import student_stream_priority
    from hybrid_distill.evaluate.packed_projections import packed_decode_choice
    from hybrid_distill.models.mixers import kernels

    validators = {name: (lambda name=name: kernels.op_choice(name)) for name in kernels.OP_CHOICES}
    validators.update(HD_MIXER_BACKEND=kernels.mixer_backend, HD_KL_ROWS=kl_rows_choice, HD_KL_HEADS=kl_heads_choice,
                      HD_KL_TEACHER_ROWS=kl_teacher_rows,
                      HD_MERGED_PROJECTIONS=merged_projections_choice, HD_SDPA=sdpa_choice,
                      HD_PACKED_DECODE=packed_decode_choice, HD_TEACHER_AHEAD_PRIORITY=student_stream_priority)
    errors = []
    for name in sorted(switches):
        if name in validators:
            with _environment({name: switches[name]}):
                try:
                    validators[name]()
                except ValueError as error:
                    errors.append(str(error))
        elif name.startswith("HD_") and name not in HARNESS_SWITCHES:
            errors.append(f"{name} is not a switch the library reads")
    return errors


def _parse(parser, args: list[str]):
    """argparse's result, or its one-line complaint as a ValueError (it would otherwise exit)."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return parser.parse_args(args)
    except SystemExit:
        raise ValueError(complaint.getvalue().strip().splitlines()[-1]) from None


def check_bench(args: list[str]) -> str:
    from hybrid_distill.cli import build_parser
    from hybrid_distill.cli_more import bench_settings
    from hybrid_distill.distill.bench import BenchSettings

    BenchSettings(**bench_settings(_parse(build_parser(), ["bench", *args])))
    return "parsed"


def check_tests(args: list[str]) -> str:
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *args], cwd=ROOT, capture_output=True, text=True)
    summary = collected.stdout.strip().splitlines()[-1] if collected.stdout.strip() else collected.stderr.strip()
    selected = re.match(r"(\d+)(/\d+)? tests? collected", summary)
    if collected.returncode != 0 or not selected or int(selected.group(1)) == 0:
        raise ValueError(f"pytest selects no test ({summary})")
    return f"{selected.group(1)} tests selected"


def check_script(args: list[str]) -> str:
    path, script_args = Path(args[0]), args[1:]
    if not path.is_file():
        raise ValueError(f"{path}: no such script")
    spec = importlib.util.spec_from_file_location(f"rehearsed_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "build_parser"):
        _parse(module.build_parser(), script_args)
        return "parsed"
    if script_args:
        raise ValueError(f"{path.name} takes no arguments, given {' '.join(script_args)}")
    return "imported"


def check_unknown_part(args: list[str]) -> str:
    raise ValueError(f"{Path(args[0]).name} has no part {args[1]!r}")


CHECKS = {"bench": check_bench, "tests": check_tests, "script": check_script, "unknown_part": check_unknown_part}


def check(records_path: Path) -> int:
    """Checks every recorded command; prints one line each and returns the number that failed."""
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    if not records:
        print(f"{records_path}: no command recorded")
        return 1
    failed = 0
    for entry in records:
        errors = switch_errors(entry["switches"])
        outcome = ""
        if not errors:
            try:
                with _environment(entry["switches"]):
                    outcome = CHECKS[entry["kind"]](entry["args"])
            except (ValueError, TypeError) as error:
                errors.append(str(error))
        failed += bool(errors)
        switches = " ".join(f"{name}={value}" for name, value in entry["switches"].items())
        command = " ".join(filter(None, [switches, entry["kind"], *entry["args"]]))
        print(f"{'FAILED' if errors else 'ok'}: {command}: {'; '.join(errors) or outcome}")
    print(f"{len(records) - failed} of {len(records)} commands would run")
    return failed


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "record" and argv[1] in CHECKS:
        record(argv[1], argv[2:])
        return 0
    if len(argv) == 2 and argv[0] == "check":
        return 1 if check(Path(argv[1])) else 0
    print("usage: rehearse.py record bench|tests|script|unknown_part ARGS... | rehearse.py check FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
