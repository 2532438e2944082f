# python -m pytest tests/test_mutants.py -q
"""bench/mutants.py stays in step with the code: every mutant's original text occurs once in its file and every
test it names exists (running the mutants themselves takes tens of minutes: python bench/mutants.py)."""
import os
import re

import pytest

from bench.mutants import MUTANTS
from conftest import ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m["name"] for m in MUTANTS])
def test_mutant_applies_and_names_existing_tests(mutant):
    with open(os.path.join(ROOT, mutant["file"])) as f:
        assert f.read().count(mutant["original"]) == 1
    assert mutant["mutated"] != mutant["original"] and mutant["tests"]
    for test in mutant["tests"]:
        path, name = test.split("::")
        with open(os.path.join(ROOT, path)) as f:
            assert re.search(rf"^def {name}\(", f.read(), re.MULTILINE), test


def test_names_are_unique_and_there_are_at_least_twenty():
    names = [m["name"] for m in MUTANTS]
    assert len(names) == len(set(names)) >= 20
