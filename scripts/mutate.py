"""Mutation testing of the modules that hold the log's rules (``make mutate``).

Each target is one module (or package) run against the tests meant for it, in two passes:

1. **mutmut** mutates every plain function and method (it works in a ``mutants/`` copy and
   runs the tests that cover each mutant).
2. **declarations**: mutmut leaves out what is evaluated when a module is imported and every
   decorated function, which is where most rules live here: pydantic fields and their bounds
   and patterns, ``Literal`` value sets, module constants, ``@field_validator`` /
   ``@model_validator`` bodies, properties. This pass mutates those with mutmut's own
   operators plus a number moved down by one, a ``raise`` deleted, a regex anchor dropped
   and a regex repeat bound moved by one, writes each mutant into a copy of the tree and
   runs the target's tests there.

A surviving mutant that cannot change behaviour is listed in ``tests/mutation/equivalent.toml``
with the reason, keyed by module, function (or declaration) and the changed source lines, so
the mark outlives unrelated edits and mutant renumbering. The score counts only mutants
that change behaviour: ``killed / (mutants - equivalent)``.

Usage::

    .venv/bin/python scripts/mutate.py              # every target
    .venv/bin/python scripts/mutate.py events slots # some targets
    .venv/bin/python scripts/mutate.py --list       # the table

Everything it writes is under ``mutants/`` (ignored by git) and ``reports/mutation.json``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider
from mutmut.mutation.mutators import mutation_operators, operator_arg_removal

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"
EQUIVALENT_FILE = ROOT / "tests" / "mutation" / "equivalent.toml"
REPORT = ROOT / "reports" / "mutation.json"
# What a copy of the tree needs besides the mutated module: the packages, the tests and
# pytest's settings. Targets add data files their tests read.
SOURCE_DIRS = ("src", "infra")
COMMON_COPY = ("tests", "pyproject.toml")


@dataclass(frozen=True)
class Target:
    """One module with rules, and the tests meant for it."""

    name: str
    paths: tuple[str, ...]  # files to mutate, relative to the repository
    tests: tuple[str, ...]
    # Globs on qualified names (``decide``, ``CircuitBreaker.*``) of the functions and
    # declarations to mutate; empty means the whole module.
    only: tuple[str, ...] = ()
    also_copy: tuple[str, ...] = ()
    goal: float = 90.0  # percent, counting only mutants that change behaviour


TARGETS: tuple[Target, ...] = (
    Target("settings", ("infra/settings.py",),
           ("tests/infra/test_infra_settings.py",),
           also_copy=("environments", "Pulumi.yaml")),
    Target("events", ("src/audit_worker/events.py",),
           ("tests/unit/worker/test_events.py", "tests/unit/worker/test_event_rules.py",
            "tests/unit/test_fuzz_events.py")),
    Target("promotion", ("src/auditctl/promotion.py",),
           ("tests/unit/auditctl/test_auditctl_promotion.py",)),
    Target("gates", ("src/auditctl/gates.py",),
           ("tests/unit/auditctl/test_auditctl_gates.py",)),
    Target("slots", ("src/audit_worker/slots.py",),
           ("tests/unit/test_slot_decisions.py",),
           # SlotGate.check, activate and read_control talk to Redis (integration tests).
           only=("SLOTS", "ControlValue.*", "EpochMemory.*", "SlotDecision.*",
                 "parse_control", "decide", "UNGATED")),
    Target("breaker", ("src/audit_worker/resilience.py",),
           ("tests/unit/test_breaker.py",),
           only=("BreakerState.*", "BreakerOpen.*", "CircuitBreaker.*")),
    Target("merkle", tuple(f"src/audit_worker/merkle/{name}.py"
                           for name in ("__init__", "compact", "hasher", "tree", "verify")),
           ("tests/unit/merkle",)),
    Target("verifier", ("src/audit_worker/verify.py",),
           ("tests/unit/worker/test_verify_checks.py",),
           # The pure checks; the rest reads PostgreSQL (integration tests).
           only=("_MAX_FINDINGS_PER_KIND", "_column_problems", "Finding.*", "VerifyReport.*",
                 "_Collector.*", "_signed_by_any", "_Chunk.*", "_check_row",
                 "_ChunkChecker.*", "_Assembler.*")),
)

KILLED = frozenset({"killed", "timeout", "caught by type check", "segfault"})


# --------------------------------------------------------------------------- results


@dataclass
class Mutant:
    """One mutant: where it is, what it changes, and what the tests made of it."""

    id: str
    module: str  # repository path of the mutated file
    function: str  # qualified name of the function or declaration
    original: str  # the changed source lines, stripped, before ...
    mutated: str  # ... and after
    status: str
    equivalent: str | None = None  # the reason, when marked equivalent


@dataclass
class Score:
    target: str
    mutants: int
    killed: int
    equivalent: int
    seconds: float
    goal: float
    survivors: list[Mutant] = field(default_factory=list)

    @property
    def percent(self) -> float:
        counted = self.mutants - self.equivalent
        return 100.0 * self.killed / counted if counted else 100.0


def changed_lines(before: str, after: str) -> tuple[str, str]:
    """The lines a mutation changed, stripped: the key an equivalence mark is filed under."""
    removed, added = [], []
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return "\n".join(removed), "\n".join(added)


def diff_sides(diff: str) -> tuple[str, str]:
    """The removed and added lines of a unified diff, stripped."""
    removed = [ln[1:].strip() for ln in diff.splitlines()
               if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines()
             if ln.startswith("+") and not ln.startswith("+++")]
    return "\n".join(removed), "\n".join(added)


@dataclass(frozen=True)
class Equivalent:
    module: str
    function: str
    original: str
    mutated: str
    reason: str

    def matches(self, m: Mutant) -> bool:
        # mutated = "*": every mutation of that source line (a line nothing can observe)
        return (self.module, self.function, self.original) == (
            m.module, m.function, m.original) and self.mutated in ("*", m.mutated)


def load_equivalents(path: Path = EQUIVALENT_FILE) -> list[Equivalent]:
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    marks = []
    for entry in data.get("equivalent", []):
        marks.append(Equivalent(entry["module"], entry["function"], entry["original"].strip(),
                                entry["mutated"].strip(), entry["reason"].strip()))
    return marks


def selected(target: Target, qualname: str) -> bool:
    return not target.only or any(fnmatch.fnmatchcase(qualname, p) for p in target.only)


# --------------------------------------------------------------------------- copies


def _copy_tree(target: Target, dest: Path) -> None:
    """A copy of what the target's tests need, for tests to import the mutated module."""
    dest.mkdir(parents=True)
    for name in (*SOURCE_DIRS, *COMMON_COPY, *target.also_copy):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", ".hypothesis", "mutants"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def _module_name(path: str) -> str:
    dotted = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The copy's packages come before the editable install; no bytecode, so a mutant
    # written in the same second as the one before it is never run from a stale .pyc.
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), str(copy)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# --------------------------------------------------------------------------- pass 1: mutmut


def _mutmut() -> str:
    found = Path(sys.executable).parent / "mutmut"
    return str(found) if found.exists() else (shutil.which("mutmut") or "mutmut")


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _mutmut_names(target: Target) -> list[str]:
    """mutmut's mutant-name globs for the target's ``only`` filter."""
    names = []
    for path in target.paths:
        module = _module_name(path)
        for pattern in target.only:
            cls, dot, func = pattern.rpartition(".")
            names.append(f"{module}.xǁ{cls}ǁ{func}__mutmut_*" if dot
                         else f"{module}.x_{func}__mutmut_*")
    return names


def _qualname_of(mutant_id: str) -> str:
    mangled = mutant_id.partition("__mutmut_")[0].rpartition(".")[2]
    if mangled.startswith("xǁ"):
        cls, _, func = mangled[2:].partition("ǁ")
        return f"{cls}.{func}"
    return mangled.removeprefix("x_")


def run_mutmut(target: Target, run_dir: Path, log: Callable[[str], None]) -> list[Mutant]:
    """Pass 1 in ``run_dir`` (a tree of symlinks plus a pyproject.toml with the target's
    [tool.mutmut] table), returning every mutant of the selected functions."""
    run_dir.mkdir(parents=True)
    for name in (*SOURCE_DIRS, *target.also_copy, "tests"):
        (run_dir / name).symlink_to(ROOT / name)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if "[tool.mutmut]" in pyproject:
        raise SystemExit("pyproject.toml has a [tool.mutmut] table: scripts/mutate.py sets it")
    (run_dir / "pyproject.toml").write_text(
        pyproject + "\n[tool.mutmut]\n"
        f"source_paths = {_toml_list(SOURCE_DIRS)}\n"
        f"only_mutate = {_toml_list(target.paths)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(target.tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
        f"also_copy = {_toml_list(target.also_copy)}\n"
        "use_git_change_detection = false\n"
        # A mutant that loops (a proof walk that never ends) is a kill: find out sooner
        # than mutmut's default of 15 times the tests' own time.
        "timeout_multiplier = 5.0\n",
        encoding="utf-8")
    mutmut = _mutmut()
    with (run_dir / "mutmut.log").open("w", encoding="utf-8") as out:
        done = subprocess.run([mutmut, "run", "--max-children", "2", *_mutmut_names(target)],
                              cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, check=False)
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=run_dir,
                             capture_output=True, text=True, check=False).stdout
    found = [line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line]
    if done.returncode != 0 and not found:
        log(f"  mutmut failed (exit {done.returncode}); see {run_dir / 'mutmut.log'}")
        raise SystemExit(1)
    by_module = {_module_name(p): p for p in target.paths}
    mutants = []
    for mutant_id, status in found:
        module = next((path for name, path in by_module.items()
                       if mutant_id.startswith(name + ".x")), None)
        qualname = _qualname_of(mutant_id)
        if module is None or not selected(target, qualname):
            continue
        mutants.append(Mutant(mutant_id, module, qualname, "", "", status))

    def describe(m: Mutant) -> None:
        shown = subprocess.run([mutmut, "show", m.id], cwd=run_dir, capture_output=True,
                               text=True, check=False).stdout
        m.original, m.mutated = diff_sides(shown)

    with ThreadPoolExecutor(2) as pool:  # only survivors need describing
        list(pool.map(describe, [m for m in mutants if m.status not in KILLED]))
    return mutants


# --------------------------------------------------------------------------- pass 2: declarations


_BOUND_KEYWORDS = frozenset({"ge", "gt", "le", "lt", "min_length", "max_length",
                             "max_digits", "decimal_places", "multiple_of"})
_NOT_BEHAVIOUR = frozenset({"description", "title", "examples"})  # documentation only
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _is_regex(node: cst.SimpleString) -> bool:
    """Anchored literals are regexes here (no message starts with ^ or ends with $)."""
    try:
        value = node.evaluated_value
    except Exception:
        return False
    return isinstance(value, str) and (value.startswith("^") or value.endswith("$"))


def _regex_mutants(node: cst.SimpleString) -> Iterator[cst.SimpleString]:
    """A whole-string match loosened at either end, and each repeat bound moved by one."""
    quote_at = min(i for i in (node.value.find('"'), node.value.find("'")) if i != -1)
    prefix, body = node.value[:quote_at], node.value[quote_at:]
    quote = body[:3] if body[:3] in ('"""', "'''") else body[0]
    text = body[len(quote):-len(quote)]

    def make(new_text: str) -> cst.SimpleString:
        return node.with_changes(value=f"{prefix}{quote}{new_text}{quote}")

    if text.startswith("^"):
        yield make(text[1:])
    if text.endswith("$") and not text.endswith("\\$"):
        yield make(text[:-1])
    for match in _REPEAT.finditer(text):
        lo, hi = match.group(1), match.group(2)
        options = [(str(int(lo) + d), hi) for d in (-1, 1) if int(lo) + d >= 0]
        if hi:
            options += [(lo, str(int(hi) + d)) for d in (-1, 1) if int(hi) + d >= int(lo)]
        for new_lo, new_hi in options:
            if hi is not None and new_hi is not None and new_hi and int(new_hi) < int(new_lo):
                continue
            shown = "{" + new_lo + ("" if hi is None else "," + (new_hi or "")) + "}"
            yield make(text[:match.start()] + shown + text[match.end():])


class _Collector(cst.CSTVisitor):
    """Finds the nodes mutmut does not mutate and proposes replacements for them.

    Scopes: module-level assignments, class-body statements and whole decorated functions
    (not their decorators). Plain functions and methods are mutmut's.
    """

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, target: Target, ignored_lines: set[int]) -> None:
        self.target = target
        self.ignored_lines = ignored_lines
        self.found: list[tuple[str, cst.CSTNode, cst.CSTNode]] = []
        self._scope: list[str] = []  # class names
        self._decl: str | None = None  # qualified name of the declaration being walked
        self._in_decorated = False
        self._skip_depth = 0  # inside a subtree that is not behaviour (annotation, docs)
        self._literal_depth = 0  # inside Literal[...] of an annotation

    # -- scopes
    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        if self._decl is not None:
            return False
        self._scope.append(node.name.value)
        return True

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        if self._decl is None:
            self._scope.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        if self._decl is not None:
            return True  # a nested function inside a decorated one: part of it
        plain = all(isinstance(d.decorator, cst.Name)
                    and d.decorator.value in ("staticmethod", "classmethod")
                    for d in node.decorators)
        if plain:
            return False  # mutmut's
        qualname = ".".join([*self._scope, node.name.value])
        if not selected(self.target, qualname):
            return False
        self._decl, self._in_decorated = qualname, True
        for part in (node.params, node.body):
            part.visit(self)
        self._decl, self._in_decorated = None, False
        return False

    def _declaration(self, names: Sequence[str], body: cst.CSTNode) -> None:
        if not names or names == ["__all__"]:
            return
        qualname = ".".join([*self._scope, names[0]])
        if not selected(self.target, qualname):
            return
        self._decl = qualname
        body.visit(self)
        self._decl = None

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> bool:
        if self._decl is not None:
            return True
        for stmt in node.body:
            if isinstance(stmt, cst.Assign):
                names = [t.target.value for t in stmt.targets if isinstance(t.target, cst.Name)]
                self._declaration(names, stmt.value)
            elif isinstance(stmt, cst.AnnAssign) and isinstance(stmt.target, cst.Name):
                self._declaration([stmt.target.value], stmt)
        return False

    # -- subtrees that are not behaviour
    def visit_Decorator(self, node: cst.Decorator) -> bool:
        return False

    def visit_Annotation(self, node: cst.Annotation) -> bool:
        self._skip_depth += 1
        return True

    def leave_Annotation(self, original_node: cst.Annotation) -> None:
        self._skip_depth -= 1

    def visit_Subscript(self, node: cst.Subscript) -> bool:
        if isinstance(node.value, cst.Name) and node.value.value == "Literal":
            self._literal_depth += 1  # the allowed values are a rule, annotation or not
        return True

    def leave_Subscript(self, original_node: cst.Subscript) -> None:
        if isinstance(original_node.value, cst.Name) and original_node.value.value == "Literal":
            self._literal_depth -= 1

    def visit_Arg(self, node: cst.Arg) -> bool:
        return node.keyword is None or node.keyword.value not in _NOT_BEHAVIOUR

    def visit_Expr(self, node: cst.Expr) -> bool:
        return not isinstance(node.value, cst.SimpleString | cst.ConcatenatedString)  # docs

    # -- proposals
    def on_visit(self, node: cst.CSTNode) -> bool:
        if not super().on_visit(node):
            return False
        if self._decl is None:
            return True
        position = self.get_metadata(PositionProvider, node, None)
        if position is not None and position.start.line in self.ignored_lines:
            return True
        if self._skip_depth and not self._literal_depth:
            return True
        for new in self._proposals(node):
            self.found.append((self._decl, node, new))
        return True

    def _proposals(self, node: cst.CSTNode) -> Iterator[cst.CSTNode]:
        if self._skip_depth:  # a Literal[...] member inside an annotation
            if isinstance(node, cst.Integer | cst.SimpleString):
                yield from self._operators(node)
            return
        if isinstance(node, cst.SimpleString) and _is_regex(node):
            yield from _regex_mutants(node)
            return
        if isinstance(node, cst.Integer):  # mutmut only adds one
            value = node.evaluated_value
            yield (node.with_changes(value=str(value - 1)) if value else
                   cst.UnaryOperation(operator=cst.Minus(), expression=cst.Integer("1")))
        if isinstance(node, cst.Raise):
            yield cst.Pass()
        if isinstance(node, cst.Call) and not self._in_decorated:
            # A declaration's keyword dropped (a bound, a default, a flag); mutmut's own
            # argument removal would also set each to None, which says the same twice.
            for i, arg in enumerate(node.args):
                if arg.keyword is not None and arg.keyword.value not in _NOT_BEHAVIOUR:
                    yield node.with_changes(args=[*node.args[:i], *node.args[i + 1:]])
        yield from self._operators(node)

    def _operators(self, node: cst.CSTNode) -> Iterator[cst.CSTNode]:
        for kind, operator in mutation_operators:
            if not isinstance(node, kind):
                continue
            if operator is operator_arg_removal and not self._in_decorated:
                continue
            yield from operator(node)


def _ignored_lines(source: str) -> set[int]:
    return {n for n, line in enumerate(source.splitlines(), 1) if "pragma: no mutate" in line}


def declaration_mutants(target: Target, path: str) -> list[tuple[Mutant, str]]:
    """Every pass-2 mutant of one file, with the mutated source."""
    source = (ROOT / path).read_text(encoding="utf-8")
    wrapper = MetadataWrapper(cst.parse_module(source))
    collector = _Collector(target, _ignored_lines(source))
    wrapper.visit(collector)
    module = wrapper.module
    out: list[tuple[Mutant, str]] = []
    seen: set[str] = set()
    for n, (decl, node, new) in enumerate(collector.found, 1):
        code = cast(cst.Module, module.deep_replace(node, new)).code
        if code == source or code in seen:
            continue
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        seen.add(code)
        original, mutated = changed_lines(source, code)
        out.append((Mutant(f"{_module_name(path)}:decl_{n}", path, decl, original, mutated,
                           "not checked"), code))
    return out


PROJECT_MODULES = ("audit_worker", "auditctl", "infra", "tests", "stackkit", "conftest")
_HARNESS_FAILED = 98  # the child could not run pytest at all
_WRONG_MODULE = 99  # the tests imported the module from somewhere else than the copy


def _pytest_args(target: Target) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *target.tests]


def _preload(target: Target, copy: Path) -> None:
    """Import, in this process, every third-party module the target's tests load, so that
    each forked child starts with them in memory (a fresh interpreter costs seconds)."""
    listing = copy / "preload.txt"
    script = ("import sys, pytest; pytest.main(sys.argv[2:]); "
              "open(sys.argv[1], 'w').write('\\n'.join({n.split('.')[0] for n in sys.modules}))")
    subprocess.run([sys.executable, "-c", script, str(listing), "--collect-only",
                    *_pytest_args(target)], cwd=copy, env=_env(copy),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    sys.dont_write_bytecode = True  # children inherit it: no stale .pyc between mutants
    for name in sorted(set(listing.read_text().split()) - set(PROJECT_MODULES)):
        if name.startswith("_") or name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # one that does not import alone is loaded by the tests later
            continue


def _child(target: Target, copy: Path, verify: Sequence[str]) -> None:
    """In a forked child: run the target's tests against the copy, exit with pytest's code."""
    code = _HARNESS_FAILED
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.chdir(copy)
        for name in [n for n in sys.modules if n.split(".")[0] in PROJECT_MODULES]:
            del sys.modules[name]
        editable = (ROOT / "src").resolve()
        sys.path[:] = [str(copy / "src"), str(copy),
                       *(p for p in sys.path if p and Path(p).resolve() != editable)]
        importlib.invalidate_caches()
        import pytest

        code = int(pytest.main(_pytest_args(target)))
        for name in verify:
            if not Path(sys.modules[name].__file__ or "").resolve().is_relative_to(copy):
                code = _WRONG_MODULE
    finally:
        os._exit(code)


def _status(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return "killed"  # the mutant crashed the interpreter
    code = os.waitstatus_to_exitcode(wait_status)
    if code in (_HARNESS_FAILED, _WRONG_MODULE):
        return "suspicious"
    return {0: "survived", 5: "no tests"}.get(code, "killed")


def _run_forked(target: Target, jobs: Sequence[tuple[Mutant | None, str | None]],
                copies: Sequence[Path], timeout: float | None) -> list[float]:
    """Run each job (a mutant and its source; None for a clean run) in a forked child, one
    child per copy at a time. Sets each mutant's status; returns each job's seconds."""
    free = list(copies)
    running: dict[int, tuple[int, Path, str, float]] = {}
    seconds = [0.0] * len(jobs)
    queue = iter(enumerate(jobs))
    verify = [_module_name(p) for p in target.paths]
    clean_status = ""
    done = 0
    while True:
        while free and (item := next(queue, None)) is not None:
            n, (mutant, code) = item
            copy = free.pop()
            original = ""
            if mutant is not None and code is not None:
                file = copy / mutant.module
                original = file.read_text(encoding="utf-8")
                file.write_text(code, encoding="utf-8")
            pid = os.fork()
            if pid == 0:
                _child(target, copy.resolve(), verify if mutant is None else ())
            running[pid] = (n, copy, original, time.perf_counter())
        if not running:
            break
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (n, _, _, started) in running.items():
                if timeout is not None and time.perf_counter() - started > timeout:
                    os.kill(child, signal.SIGKILL)
                    jobs[n][0].status = "timeout"  # type: ignore[union-attr]
            time.sleep(0.02)
            continue
        n, copy, original, started = running.pop(pid)
        seconds[n] = time.perf_counter() - started
        done += 1
        if len(jobs) > 1 and done % 50 == 0:
            print(f"    {done}/{len(jobs)}", flush=True)
        mutant = jobs[n][0]
        if mutant is None:
            clean_status = _status(wait_status)
        else:
            (copy / mutant.module).write_text(original, encoding="utf-8")
            if mutant.status != "timeout":
                mutant.status = _status(wait_status)
        free.append(copy)
    if clean_status not in ("", "survived"):
        raise SystemExit(f"{target.name}: the tests do not pass on the unmutated copy "
                         f"({clean_status}); run them: .venv/bin/python -m pytest "
                         f"{' '.join(target.tests)}")
    return seconds


def run_declarations(target: Target, pending: list[tuple[Mutant, str]], run_dir: Path,
                     log: Callable[[str], None]) -> list[Mutant]:
    """Pass 2: each mutant written into one of two tree copies, the target's tests run in a
    child forked from this (pre-warmed) process."""
    if not pending:
        return []
    copies = [run_dir / f"declarations-{i}" for i in range(2)]
    for copy in copies:
        _copy_tree(target, copy)
    _preload(target, copies[0])
    (clean,) = _run_forked(target, [(None, None)], copies[:1], None)
    log(f"  declarations: {len(pending)} mutants (clean run {clean:.1f}s)")
    _run_forked(target, pending, copies, 10 * clean + 10)
    return [mutant for mutant, _ in pending]


# --------------------------------------------------------------------------- report


def score(target: Target, mutants: list[Mutant], marks: list[Equivalent],
          seconds: float) -> Score:
    result = Score(target.name, len(mutants), 0, 0, seconds, target.goal)
    for m in mutants:
        if m.status in KILLED:
            result.killed += 1
            continue
        mark = next((e for e in marks if e.matches(m)), None)
        if mark is not None:
            m.equivalent = mark.reason
            result.equivalent += 1
        else:
            result.survivors.append(m)
    return result


def _indent(text: str, mark: str) -> str:
    return "\n".join(f"      {mark} {line}" for line in text.splitlines()) or f"      {mark}"


def print_report(scores: list[Score], stale: list[Equivalent]) -> None:
    print()
    print(f"{'target':<10} {'mutants':>7} {'killed':>7} {'equiv.':>7} {'survived':>8} "
          f"{'score':>7} {'goal':>5} {'time':>7}")
    for s in scores:
        flag = "" if s.percent >= s.goal else "  below goal"
        print(f"{s.target:<10} {s.mutants:>7} {s.killed:>7} {s.equivalent:>7} "
              f"{len(s.survivors):>8} {s.percent:>6.1f}% {s.goal:>4.0f}% "
              f"{s.seconds:>6.0f}s{flag}")
    for s in scores:
        if not s.survivors:
            continue
        print(f"\nsurvivors of {s.target}:")
        for m in s.survivors:
            print(f"  {m.module} {m.function} [{m.status}] ({m.id})")
            print(_indent(m.original, "-"))
            print(_indent(m.mutated, "+"))
    if stale:
        print(f"\n{EQUIVALENT_FILE.relative_to(ROOT)}: marks that matched no surviving mutant "
              "(remove them, or the code they describe changed):")
        for e in stale:
            print(f"  {e.module} {e.function}: {e.original!r} -> {e.mutated!r}")


def write_report(scores: list[Score], mutants: dict[str, list[dict[str, object]]],
                 seconds: float) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps({
        "seconds": round(seconds),
        "scores": [{"target": s.target, "mutants": s.mutants, "killed": s.killed,
                    "equivalent": s.equivalent, "survived": len(s.survivors),
                    "percent": round(s.percent, 1), "seconds": round(s.seconds)}
                   for s in scores],
        "mutants": mutants,
    }, indent=1), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--pass", dest="passes", choices=("both", "mutmut", "declarations"),
                        default="both", help="run one pass only (while writing tests)")
    args = parser.parse_args(argv)
    by_name = {t.name: t for t in TARGETS}
    if args.list:
        for t in TARGETS:
            print(f"{t.name:<10} {' '.join(t.paths)}\n{'':<10} tests: {' '.join(t.tests)}"
                  + (f"\n{'':<10} only: {' '.join(t.only)}" if t.only else ""))
        return 0
    unknown = [n for n in args.targets if n not in by_name]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.targets] if args.targets else list(TARGETS)
    marks = load_equivalents()
    used: set[Equivalent] = set()
    scores: list[Score] = []
    everything: dict[str, list[dict[str, object]]] = {}
    started_all = time.perf_counter()
    for target in chosen:
        print(f"{target.name}: {', '.join(target.paths)} against {', '.join(target.tests)}",
              flush=True)
        started = time.perf_counter()
        run_dir = WORK / target.name
        shutil.rmtree(run_dir, ignore_errors=True)  # results must follow the current tests
        # Declarations are generated first: a problem there shows before mutmut's long run.
        declared = [] if args.passes == "mutmut" else [
            pair for path in target.paths for pair in declaration_mutants(target, path)]
        mutants = [] if args.passes == "declarations" else run_mutmut(
            target, run_dir / "mutmut", print)
        mutants += run_declarations(target, declared, run_dir, print)
        result = score(target, mutants, marks, time.perf_counter() - started)
        used |= {e for e in marks for m in mutants if m.equivalent and e.matches(m)}
        print(f"  {result.percent:.1f}% of {result.mutants - result.equivalent} "
              f"({result.equivalent} equivalent) in {result.seconds:.0f}s", flush=True)
        scores.append(result)
        everything[target.name] = [asdict(m) for m in mutants]
        write_report(scores, everything, time.perf_counter() - started_all)  # after each
    chosen_paths = {p for t in chosen for p in t.paths}
    stale = [e for e in marks if e.module in chosen_paths and e not in used]
    print_report(scores, stale)
    print(f"\nall mutants and their status: {REPORT.relative_to(ROOT)}")
    return 0 if all(s.percent >= s.goal for s in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
