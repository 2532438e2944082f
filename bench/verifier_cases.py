"""
Math-Verify's own regression cases through verifier.py: an independent table of (gold, prediction, expected)
written by another team, most of it "from observations of model outputs" (their words), with NuminaMath and
OpenThoughts answers among them.

    pip download math-verify==0.9.0 --no-binary :all: --no-deps -d /tmp/mv
    python bench/verifier_cases.py /tmp/mv/math_verify-0.9.0.tar.gz [--show 80]

The cases are read from the sdist's tests/test_*.py with ast.literal_eval on the arguments of each
@pytest.mark.parametrize that names gold and pred: nothing from the file is executed, and nothing of it is kept in
this repository. Each gold goes to grade() as written (ours drops the $ delimiters and reads a solution's last box).
Their expectations follow Math-Verify's conventions, some of which ours does not share on purpose (a fraction
gold is not met by a 16-digit decimal, {1, 3} is a set and not the point (1, 3), an inline $...$ may span lines);
the README's Verifier section sorts the disagreements of the last run.
"""

import argparse
import ast
import os
import sys
import tarfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verifier import verify_batch  # noqa: E402


def test_sources(path):
    """(file name, source) of every tests/test_*.py in an sdist tarball or a tests folder."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.startswith("test_") and n.endswith(".py"))
        return [(n, open(os.path.join(path, n), encoding="utf-8").read()) for n in names]
    with tarfile.open(path) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and "/tests/test_" in m.name
                          and m.name.endswith(".py")), key=lambda m: m.name)
        return [(os.path.basename(m.name), archive.extractfile(m).read().decode("utf-8")) for m in members]


def parametrized_cases(file_name, source):
    """(file, test, gold, pred, expected) from each parametrize decorator whose names include gold and pred;
    rows that are not plain literals (pytest.param(...)) are skipped."""
    cases = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"):
                continue
            names = ast.literal_eval(decorator.args[0])
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            if not {"gold", "pred"} <= set(names):
                continue
            for element in decorator.args[1].elts:
                try:
                    row = dict(zip(names, ast.literal_eval(element)))
                except ValueError:
                    continue
                expected = row.get("expected", row.get("result"))
                if expected is not None:
                    cases.append((file_name, node.name, row["gold"], row["pred"], bool(expected)))
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("source", help="Math-Verify's sdist (.tar.gz) or its tests/ folder")
    parser.add_argument("--show", type=int, default=80, help="disagreements printed")
    args = parser.parse_args()
    cases = [case for name, source in test_sources(args.source) for case in parametrized_cases(name, source)]
    if not cases:
        sys.exit(f"no parametrized gold/pred cases in {args.source}")
    verdicts = verify_batch([(pred, gold) for _, _, gold, pred, _ in cases])
    disagreements = [(case, verdict) for case, verdict in zip(cases, verdicts) if verdict.correct != case[4]]
    files = len({c[0] for c in cases})
    print(f"{len(cases)} cases from {files} files; ours agrees on {len(cases) - len(disagreements)}, "
          f"disagrees on {len(disagreements)} (expected correct: {sum(c[4] for c, _ in disagreements)}, "
          f"expected wrong: {sum(not c[4] for c, _ in disagreements)})")
    for test, count in Counter(f"{c[0]}::{c[1]}" for c, _ in disagreements).most_common():
        print(f"  {count:3d}  {test}")
    for (file_name, test, gold, pred, expected), verdict in disagreements[: args.show]:
        shown = pred if len(pred) <= 160 else "..." + pred[-157:]
        print(f"\n{test}: expected {'correct' if expected else 'wrong'}, ours {verdict.status} ({verdict.reason})\n"
              f"  gold {gold[:160]!r}\n  pred {shown!r}\n  ours read {str(verdict.answer)[:120]!r}")


if __name__ == "__main__":
    main()
