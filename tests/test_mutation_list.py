"""tests/mutation_check.py's mutants follow the code: each one's original text occurs exactly once in its file (a
change that moves or rewrites such a line must update the mutant, or the mutation check would report it stale)."""

import pytest

from tests.mutation_check import MUTANTS, ROOT


def test_there_are_at_least_twenty_distinct_mutants():
    assert len(MUTANTS) >= 20 and len({m.id for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_each_mutant_applies_to_exactly_one_line(mutant):
    text = (ROOT / mutant.path).read_text()
    found = text.count(mutant.original)
    assert found == 1, f"{mutant.path}: {mutant.original!r} found {found} times"
    assert mutant.original != mutant.mutated and "\n" not in mutant.original + mutant.mutated
    for argument in mutant.tests:
        if argument.startswith("tests/"):
            assert (ROOT / argument.split("::")[0]).is_file(), argument
