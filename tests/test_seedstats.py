"""Mean, spread and paired verdicts over fine-tuning seeds."""
from __future__ import annotations

import math
import statistics

import pytest

from hawqlib.repro.seedstats import TARGET_VERDICTS, against, against_text, paired, summarize


def test_summary_is_the_sample_mean_and_standard_deviation():
    s = summarize([91.9, 92.1, 92.3])
    assert s.n == 3 and s.mean == pytest.approx(92.1) and s.std == pytest.approx(statistics.stdev([91.9, 92.1, 92.3]))
    assert s.text() == "92.10 ± 0.20 (3 seeds)"
    one = summarize([91.93])
    assert one.n == 1 and math.isnan(one.std) and one.text() == "91.93 (1 seed)"
    assert summarize([]).text() == "not computed"


def test_paired_uses_only_shared_seeds_and_decides_by_two_standard_errors():
    hawq = {0: 92.0, 1: 92.2, 2: 92.1, 3: 99.0}
    rev = {0: 91.5, 1: 91.8, 2: 91.5}
    p = paired(hawq, rev)
    assert p.seeds == (0, 1, 2) and p.mean == pytest.approx(0.5)
    assert p.se == pytest.approx(statistics.stdev([0.5, 0.4, 0.6]) / math.sqrt(3)) and p.verdict == "holds"
    assert paired(rev, {k: v for k, v in hawq.items() if k < 3}).verdict == "reversed"
    noisy = paired({0: 92.0, 1: 91.0, 2: 92.4}, {0: 91.9, 1: 91.4, 2: 92.0})  # +0.1, -0.4, +0.4
    assert noisy.verdict == "within noise"


def test_paired_with_one_or_no_shared_seed_decides_nothing():
    assert paired({0: 92.0}, {0: 91.0, 1: 91.0}).verdict == "undecided (one seed)"
    none = paired({0: 92.0}, {1: 91.0})
    assert none.verdict == "not computed" and none.n == 0 and math.isnan(none.mean)


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="must be finite"):
        summarize([92.0, float("nan")])
    with pytest.raises(ValueError, match="z must be a positive number"):
        paired({0: 1.0}, {0: 0.0}, z=0)


def test_a_mean_against_a_target_is_decided_by_two_standard_errors():
    s = summarize([91.75, 92.06])  # se = stdev / sqrt(2)
    assert s.se == pytest.approx(statistics.stdev([91.75, 92.06]) / math.sqrt(2))
    assert against(s, 92.34) == "missed"  # 0.435 below, about 2.8 standard errors
    assert against(s, 92.10) == "within noise" and against(s, 91.80) == "within noise"
    assert against(s, 91.50) == "met" and against(s, 92.34, z=3.0) == "within noise"
    assert against(summarize([91.75]), 80.0) == "undecided (one seed)" and math.isnan(summarize([1.0]).se)
    assert against(summarize([]), 0.0) == "not computed"
    assert {against(s, t) for t in (91.5, 92.0, 92.34)} <= set(TARGET_VERDICTS)
    with pytest.raises(ValueError, match="z must be a positive number"):
        against(s, 92.0, z=0)


def test_the_words_for_a_target_carry_the_computed_gap_and_how_firm_it_is():
    s = summarize([91.8, 92.0])  # mean 91.9, se 0.1
    assert against_text(s, 92.34) == "missed by 0.44 points (4.4 standard errors of the mean, over 2 seeds)"
    assert against_text(s, 91.50) == "met (4.0 standard errors of the mean, over 2 seeds)"
    assert against_text(s, 91.50, stretch=91.80).startswith("met, and the stretch too (4.0 standard errors")
    assert against_text(s, 91.50, stretch=92.00).startswith("met (")
    # within noise: the distance that would decide (z standard errors) is stated, not one standard error
    assert against_text(s, 92.05) == ("missed by 0.15 points on the mean, within 2 standard errors (0.20 points) "
                                      "over 2 seeds: undecided")
    assert against_text(summarize([91.75]), 92.34) == "missed by 0.59 points (one seed: undecided)"
    assert against_text(summarize([]), 92.34) == "not computed yet"
    assert against_text(summarize([92.0, 92.0]), 91.0) == "met (no spread over 2 seeds)"
