"""The profiler's arithmetic: relative L2 series, their summary, and the cache-step rule (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from cair_export.lab.profile import read_prompts
from cair_export.lab.quality_metrics import recommend_cache_step, relative_l2, summarise_series
from cair_runtime.errors import InvalidInputError


def test_relative_l2_of_a_hand_computed_pair():
    previous = np.array([3.0, 4.0])  # norm 5
    current = np.array([3.0, 5.0])  # difference (0, 1): norm 1
    assert relative_l2(current, previous) == pytest.approx(0.2)


def test_relative_l2_per_prompt_over_the_other_axes():
    previous = np.array([[[1.0, 0.0]], [[0.0, 2.0]]])  # (prompts 2, tokens 1, channels 2); norms 1 and 2
    current = np.array([[[1.0, 1.0]], [[0.0, 2.0]]])  # changes: norm 1, then 0
    np.testing.assert_allclose(relative_l2(current, previous, axes=(1, 2)), [1.0, 0.0])


def test_relative_l2_of_a_zero_reference():
    assert relative_l2(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_l2(np.ones(3), np.zeros(3)) == np.inf


def test_summary_averages_modules_then_takes_mean_and_variance_over_prompts():
    # (prompts 2, modules 2, steps 2)
    changes = np.array([[[0.4, 0.1], [0.2, 0.3]],
                        [[0.6, 0.1], [0.8, 0.1]]])
    summary = summarise_series(changes)
    # per prompt, module means: prompt 0 (0.3, 0.2), prompt 1 (0.7, 0.1)
    assert summary.steps == [2, 3]
    np.testing.assert_allclose(summary.mean, [0.5, 0.15])
    np.testing.assert_allclose(summary.variance, [0.04, 0.0025])  # ((0.2^2 + 0.2^2) / 2, (0.05^2 * 2) / 2)
    np.testing.assert_allclose(summary.per_module_mean, [[0.5, 0.1], [0.5, 0.2]])


def test_summary_refuses_a_malformed_series():
    with pytest.raises(InvalidInputError):
        summarise_series(np.zeros((2, 3)))


def test_rule_below_threshold_picks_the_first_qualifying_step():
    steps, mean = [2, 3, 4, 5, 6], [0.2, 0.08, 0.049, 0.06, 0.01]
    assert recommend_cache_step(steps, mean, 25, threshold=0.05) == 4  # first under 5 %, later rises ignored
    assert recommend_cache_step(steps, mean, 25, threshold=0.3) == 2
    assert recommend_cache_step(steps, mean, 25, threshold=0.001) == 25  # never: the baseline


def test_rule_fraction_of_first_is_scale_free():
    steps, mean = [2, 3, 4, 5], [0.008, 0.005, 0.0039, 0.002]
    assert recommend_cache_step(steps, mean, 25, threshold=0.5, rule="fraction-of-first") == 4  # < 0.004
    scaled = [100 * m for m in mean]
    assert recommend_cache_step(steps, scaled, 25, threshold=0.5, rule="fraction-of-first") == 4


def test_rule_refuses_bad_arguments():
    with pytest.raises(InvalidInputError):
        recommend_cache_step([2], [0.1], 25, threshold=0.0)
    with pytest.raises(InvalidInputError):
        recommend_cache_step([2], [0.1], 25, rule="median")
    with pytest.raises(InvalidInputError):
        recommend_cache_step([2, 3], [0.1], 25)


def test_prompt_files_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\na red circle\n  a blue square  \n")
    assert read_prompts(path) == ["a red circle", "a blue square"]
    assert read_prompts(path, limit=1) == ["a red circle"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InvalidInputError):
        read_prompts(tmp_path / "empty.txt")


def test_shipped_prompt_files_are_long_enough():
    from pathlib import Path

    import cair_export.lab

    folder = Path(cair_export.lab.__file__).parent / "prompts"
    assert len(read_prompts(folder / "shapes.txt")) >= 100
    assert 50 <= len(read_prompts(folder / "general.txt")) <= 100


def test_rule_caps_at_T_when_the_scheduler_evaluates_more_often():
    # PNDM evaluates the UNet T+1 times: a qualifying evaluation T+1 still means n = T.
    assert recommend_cache_step([2, 3, 4, 5, 6], [0.5, 0.4, 0.3, 0.2, 0.01], 5, threshold=0.05) == 5
