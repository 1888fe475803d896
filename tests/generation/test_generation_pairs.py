"""Preference pairs and KTO rows from judged samples (prefpipe.generation.pairs), against hand-picked pairs."""

import random
from collections import Counter

import pytest

from helpers import make_sample
from prefpipe.generation.pairs import (NO_PAIR_REASONS, PAIR_RULES, PairCounts, build_pairs, default_rule,
                                       kto_rows)


def judged(*specs):
    """Samples 0, 1, ... of one prompt from (completion ids, reward) pairs."""
    return [make_sample(i, ids, reward) for i, (ids, reward) in enumerate(specs)]


def indices(pairs):
    return [(c.sample_index, r.sample_index) for c, r in pairs]


def test_rules_and_defaults():
    assert PAIR_RULES == ("correct_vs_incorrect", "best_vs_worst")
    assert default_rule(True) == "correct_vs_incorrect" and default_rule(False) == "best_vs_worst"


def test_correct_vs_incorrect_pairs_the_most_frequent_answers():
    s = judged(([3], 0), ([5], 0), ([7], 1), ([5], 0), ([9], 0), ([5], 0), ([7], 1), ([8], 1))
    # Distinct by count: [5] x3 (sample 1), [7] x2 (sample 2), then [3] (0), [9] (4), [8] (7) in sampling order.
    # Correct: 2, 7; incorrect: 1, 0, 4.
    assert indices(build_pairs(s, rule="correct_vs_incorrect", pairs_per_prompt=2)[0]) == [(2, 1), (7, 0)]
    pairs, reason = build_pairs(s, rule="correct_vs_incorrect", pairs_per_prompt=3)
    assert indices(pairs) == [(2, 1), (7, 0), (2, 4)] and reason is None
    assert indices(build_pairs(s, rule="correct_vs_incorrect", pairs_per_prompt=9)[0]) == [(2, 1), (7, 0), (2, 4)]


def test_correct_vs_incorrect_reasons():
    rule = dict(rule="correct_vs_incorrect", pairs_per_prompt=2)
    assert build_pairs(judged(([1], 1), ([2], 1)), **rule) == ([], "all_correct")
    assert build_pairs(judged(([1], 0), ([2], 0), ([3], 0)), **rule) == ([], "all_wrong")
    assert build_pairs(judged(([1], 1)), **rule) == ([], "too_few_samples")
    assert build_pairs([], **rule) == ([], "too_few_samples")
    assert build_pairs(judged(([4, 2], 0), ([4, 2], 0)), **rule) == ([], "all_wrong")  # one completion twice
    assert build_pairs(judged(([1], 1), ([2], 0)), **rule, min_margin=1.5) == ([], "below_margin")


def test_correct_vs_incorrect_drops_pairs_below_the_margin():
    # Real rewards split at 0.5: correct 0 (0.9), 1 (0.6); incorrect 2 (0.4), 3 (0.45); all sampled once.
    s = judged(([1], 0.9), ([2], 0.6), ([3], 0.4), ([4], 0.45))
    assert indices(build_pairs(s, rule="correct_vs_incorrect", pairs_per_prompt=2)[0]) == [(0, 2), (1, 3)]
    # margins 0.5 and 0.15: only the first holds 0.3
    assert indices(build_pairs(s, rule="correct_vs_incorrect", pairs_per_prompt=2, min_margin=0.3)[0]) == [(0, 2)]


def test_best_vs_worst_pairs_the_ends_inwards():
    s = judged(([1], 0.2), ([2], 0.9), ([3], -0.5), ([2], 0.9), ([4], 0.1), ([5], 0.4))
    # Distinct (sample 3 repeats 1): best first 1 (.9), 5 (.4), 0 (.2), 4 (.1), 2 (-.5).
    assert build_pairs(s, rule="best_vs_worst", pairs_per_prompt=1) == ([(s[1], s[2])], None)
    assert indices(build_pairs(s, rule="best_vs_worst", pairs_per_prompt=2)[0]) == [(1, 2), (5, 4)]
    # The third pair would be sample 0 against itself (margin 0): two pairs.
    assert indices(build_pairs(s, rule="best_vs_worst", pairs_per_prompt=5)[0]) == [(1, 2), (5, 4)]
    # The second margin (0.3) is below 0.35: one pair; the first (1.4) below 2: none.
    assert indices(build_pairs(s, rule="best_vs_worst", pairs_per_prompt=3, min_margin=0.35)[0]) == [(1, 2)]
    assert build_pairs(s, rule="best_vs_worst", pairs_per_prompt=3, min_margin=2.0) == ([], "below_margin")


def test_best_vs_worst_ties_keep_sampling_order():
    s = judged(([1], 1.0), ([2], 1.0), ([3], 0.0), ([4], 0.0))
    assert indices(build_pairs(s, rule="best_vs_worst", pairs_per_prompt=2)[0]) == [(0, 2), (1, 3)]
    # 1.0 / 0.5 / 0.5 / 0.0: the second pair would be two equal rewards
    s = judged(([1], 1.0), ([2], 0.5), ([3], 0.5), ([4], 0.0))
    assert indices(build_pairs(s, rule="best_vs_worst", pairs_per_prompt=2)[0]) == [(0, 3)]


def test_best_vs_worst_reasons():
    rule = dict(rule="best_vs_worst", pairs_per_prompt=2)
    assert build_pairs(judged(([1], 0.3), ([2], 0.3), ([3], 0.3)), **rule) == ([], "all_equal")
    assert build_pairs(judged(([1], 0.3), ([1], 0.3)), **rule) == ([], "all_equal")
    assert build_pairs(judged(([1], 0.3)), **rule) == ([], "too_few_samples")
    assert build_pairs(judged(([1], 0.3), ([2], 0.2)), **rule, min_margin=0.5) == ([], "below_margin")


def test_bad_calls_are_bugs():
    with pytest.raises(ValueError, match="no finite reward"):
        build_pairs(judged(([1], 1), ([2], None)), rule="best_vs_worst", pairs_per_prompt=1)
    with pytest.raises(ValueError, match="no finite reward"):
        build_pairs(judged(([1], 1), ([2], float("nan"))), rule="best_vs_worst", pairs_per_prompt=1)
    with pytest.raises(ValueError, match="unknown pair rule"):
        build_pairs(judged(([1], 1), ([2], 0)), rule="best", pairs_per_prompt=1)
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        build_pairs(judged(([1], 1), ([2], 0)), rule="best_vs_worst", pairs_per_prompt=0)


def test_kto_rows_once_per_distinct_completion():
    s = judged(([1], 1), ([2], 0), ([1], 1), ([3], 0))
    assert [(x.sample_index, d) for x, d in kto_rows(s, binary=True)] == [(0, True), (1, False), (3, False)]
    s = judged(([1], 0.7), ([2], 0.5), ([3], 0.2), ([2], 0.5))
    assert [(x.sample_index, d) for x, d in kto_rows(s, binary=False, threshold=0.5)] == \
        [(0, True), (1, False), (2, False)]  # 0.5 is not above the threshold
    assert [d for _, d in kto_rows(s, binary=False, threshold=0.1)] == [True, True, True]
    with pytest.raises(ValueError, match="threshold"):
        kto_rows(s, binary=False)


def test_pair_counts():
    counts = PairCounts()
    rule = dict(rule="correct_vs_incorrect", pairs_per_prompt=2)
    for prompt in (judged(([1], 1), ([2], 0), ([3], 0)),  # 2 pairs
                   judged(([1], 1), ([2], 0)),  # 1 pair
                   judged(([1], 1), ([2], 1)), judged(([1], 0), ([2], 0)), judged(([1], 0), ([1], 0)),
                   judged(([1], 0))):
        counts.add(*build_pairs(prompt, **rule))
    counts.add(*build_pairs(judged(([1], 0.2), ([2], 0.2)), rule="best_vs_worst", pairs_per_prompt=1))
    counts.add(*build_pairs(judged(([1], 0.3), ([2], 0.2)), rule="best_vs_worst", pairs_per_prompt=1,
                            min_margin=0.5))
    assert counts.to_dict() == {"prompts": 8, "with_pairs": 2, "all_correct": 1, "all_wrong": 2, "all_equal": 1,
                                "below_margin": 1, "too_few_samples": 1, "pairs": 3}
    assert set(counts.to_dict()) == {"prompts", "with_pairs", "pairs", *NO_PAIR_REASONS}
    with pytest.raises(ValueError):
        counts.add([], None)
    with pytest.raises(ValueError):
        counts.add([], "no_reason_like_this")


def _old_demo_pairs(prompt, gold, samples, k):
    """The demo's pairing before it used prefpipe.generation.pairs (its code as it was), the reference."""
    from prefpipe.answers import extract_answer
    right, wrong = [], []
    for text, _ in Counter(samples).most_common():
        (right if extract_answer(text)[0] == gold else wrong).append(text)
    if not right:
        return []
    return [{"prompt": prompt, "chosen": right[i % len(right)], "rejected": wrong[i]}
            for i in range(min(k, len(wrong)))]


def test_the_demo_pairs_as_before():
    from prefpipe.demo.pairs import pairs_for_question
    rng = random.Random(0)
    answers = ["#### 3", "#### 4", "so 4", "#### 5", "4.", "####", "", "#### 04"]
    found = 0
    for _ in range(300):
        samples = [rng.choice(answers) for _ in range(rng.randint(1, 10))]
        k = rng.randint(1, 4)
        got = pairs_for_question("Q", "4", samples, k)
        assert got == _old_demo_pairs("Q", "4", samples, k), samples
        found += bool(got)
    assert 50 < found < 300  # both kinds of question were drawn
