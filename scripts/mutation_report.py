"""Per-module mutation scores and the surviving mutants, read from mutmut's results in mutants/.

Run by scripts/mutation.sh after `mutmut run`, from the repository root (mutmut reads its
configuration from pyproject.toml there). Prints the table and writes every mutant that was not
killed, with its module:line and diff, to mutants/survivors.txt (or the path given by --out).

A timeout counts as killed (the mutant made a test hang) but has a column of its own. A mutant
with no tests is in a function that no selected test runs in-process: it counts as surviving.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

SEPARATOR = "ǁ"  # mutmut's separator between class and method in a mutant's name


@dataclass
class ModuleScore:
    module: str
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def killed(self) -> int:
        return self.counts.get("killed", 0) + self.counts.get("caught by type check", 0)

    @property
    def timeout(self) -> int:
        return self.counts.get("timeout", 0)

    @property
    def not_run(self) -> int:
        return self.counts.get("not checked", 0)

    @property
    def survived(self) -> int:
        return self.total - self.killed - self.timeout - self.not_run

    @property
    def score(self) -> float | None:
        tried = self.total - self.not_run
        return None if tried == 0 else 100.0 * (self.killed + self.timeout) / tried


def function_spans(path: Path) -> dict[str, tuple[int, int]]:
    """`function` or `Class.method` -> first and last line, decorators included."""
    tree = ast.parse(path.read_text())
    spans: dict[str, tuple[int, int]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                spans[prefix + node.name] = (first, node.end_lineno or node.lineno)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return spans


def function_of(mutant: str) -> str:
    """pool.x_f__mutmut_3 -> f; pool.xǁCǁm__mutmut_3 -> C.m"""
    local = mutant.rpartition(".")[2].rsplit("__mutmut_", 1)[0]
    if local.startswith("x" + SEPARATOR):
        _, cls, method = local.split(SEPARATOR)
        return f"{cls}.{method}"
    return local.removeprefix("x_")


def source_line(path: Path, mutant: str, diff: str, spans: dict[str, tuple[int, int]]) -> int | None:
    """The line of `path` the diff changes: its first removed line, searched for within the
    function (the diff's own numbers count from the function's first line)."""
    span = spans.get(function_of(mutant))
    hunk = re.search(r"^@@ -(\d+)", diff, re.M)
    removed = next((line[1:] for line in diff.splitlines()
                    if line.startswith("-") and not line.startswith("---")), None)
    if span is None or hunk is None:
        return None
    guess = span[0] + int(hunk.group(1)) - 1
    if removed is None:
        return guess
    lines = path.read_text().splitlines()
    matches = [n for n in range(span[0], span[1] + 1) if lines[n - 1].strip() == removed.strip()]
    return min(matches, key=lambda n: abs(n - guess)) if matches else guess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="only these files, e.g. pool/backoff.py")
    parser.add_argument("--out", default="mutants/survivors.txt")
    parser.add_argument("--names", action="store_true", help="only print the survivors' names")
    args = parser.parse_args()
    wanted = {str(Path(m)) for m in args.modules}

    scores: list[ModuleScore] = []
    survivors: list[str] = []
    for path in walk_mutatable_files():
        if wanted and str(path) not in wanted:
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            continue
        score = ModuleScore(str(path))
        spans = function_spans(Path(path))
        for mutant, exit_code in sorted(data.exit_code_by_key.items(), key=lambda kv: in_order(kv[0])):
            status = status_by_exit_code[exit_code]
            score.add(status)
            if status in ("killed", "timeout", "caught by type check", "not checked"):
                continue
            if args.names:
                print(mutant)
                continue
            diff = get_diff_for_mutant(mutant, path=path)
            line = source_line(Path(path), mutant, diff, spans)
            survivors.append(f"## {path}:{line} {mutant} ({status})\n{diff}\n")
        scores.append(score)
    if args.names:
        return 0

    scores.sort(key=lambda s: s.module)
    header = (f"{'module':<26} {'killed':>6} {'timeout':>7} {'survived':>8} {'not run':>7} "
              f"{'total':>5} {'score':>7}")
    print(header)
    print("-" * len(header))
    for s in [*scores, total_of(scores)]:
        shown = "-" if s.score is None else f"{s.score:.1f}%"
        print(f"{s.module:<26} {s.killed:>6} {s.timeout:>7} {s.survived:>8} {s.not_run:>7} "
              f"{s.total:>5} {shown:>7}")
    print("\nscore = (killed + timeout) / (total - not run); a timeout is a mutant that made a test hang;"
          "\n'survived' includes mutants no selected test reaches ('no tests' in the list).")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(survivors))
    print(f"\n{len(survivors)} surviving mutants, with module:line and diff: {out}")
    return 0


def in_order(mutant: str) -> tuple[str, int]:
    """f__mutmut_2 before f__mutmut_10."""
    function, _, number = mutant.rpartition("_")
    return function, int(number)


def total_of(scores: list[ModuleScore]) -> ModuleScore:
    total = ModuleScore("all")
    for s in scores:
        for status, n in s.counts.items():
            total.counts[status] = total.counts.get(status, 0) + n
    return total


if __name__ == "__main__":
    config()  # fail here, not halfway, when run outside the repository root
    sys.exit(main())
