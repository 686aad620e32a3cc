"""The family checks: a second heavy seed within a third of the heavy-light gap, loss falling with depth."""

from __future__ import annotations

import pytest

from adasched.training.family_checks import MemberScore, describe_checks, family_checks


def family(**losses: float) -> list[MemberScore]:
    depths = {"light": 2, "light_b3": 3, "light_b4": 4, "light_b5": 5, "heavy": 6, "heavy_seed1": 6}
    return [MemberScore(name, depths[name], 1 if name == "heavy_seed1" else 0, loss) for name, loss in losses.items()]


def test_a_family_whose_seeds_agree_and_depths_differ_passes_both() -> None:
    checks = family_checks(family(light=4.8, light_b3=4.7, light_b4=4.62, light_b5=4.56, heavy=4.5, heavy_seed1=4.59))
    assert checks["seeds_agree"] and checks["falls_with_depth"]
    assert checks["heavy_light_gap"] == pytest.approx(0.3) and checks["seed_spread"] == pytest.approx(0.09)
    assert [m["member"] for m in checks["depth_ladder"]] == ["light", "light_b3", "light_b4", "light_b5", "heavy"]
    assert all(line.endswith("yes") for line in describe_checks(checks))


def test_seeds_further_apart_than_a_third_of_the_gap_fail() -> None:
    checks = family_checks(family(light=4.8, heavy=4.5, heavy_seed1=4.39))  # 0.11 > 0.3 / 3, whichever side
    assert checks["seeds_agree"] is False and checks["falls_with_depth"] is True


def test_a_deeper_member_no_better_than_a_shallower_one_fails_the_depth_order() -> None:
    checks = family_checks(family(light=4.8, light_b3=4.7, light_b4=4.71, heavy=4.5))
    assert checks["falls_with_depth"] is False and checks["seeds_agree"] is None
    assert describe_checks(checks)[-1].endswith("NO")


def test_checks_without_the_members_they_need_are_not_applicable() -> None:
    assert family_checks(family(light=4.8)) == {"seeds_agree": None, "falls_with_depth": None}
    assert describe_checks(family_checks(family(heavy=4.5))) == []


def test_two_members_of_one_depth_and_seed_are_refused() -> None:
    with pytest.raises(ValueError, match="share a depth and a seed"):
        family_checks([MemberScore("heavy", 6, 0, 4.5), MemberScore("other", 6, 0, 4.6)])
