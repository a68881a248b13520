"""--sweep's pick rules on hand-made runs: the robust pick (worst case over references, each
reference's own validity floor), the pick nearest another's KL, and the grid-edge names."""

import config
from experiments import sweep


def test_pick_setting_takes_the_best_worst_case_judge_score_that_keeps_validity_everywhere():
    def run(tag, *points):
        return {
            "tag": tag,
            "overrides": {"pref_lr": 1e-4},
            "points": [{"step": s, "judge_score": j, "valid_rate": v} for s, j, v in points],
        }

    # One reference: the floor is 0.9, so b's step 50 (0.90) is in and a's step 100 (0.80) is out.
    one = {1: [run("a", (50, 0.70, 0.95), (100, 0.90, 0.80)),
               run("b", (50, 0.75, 0.90), (100, 0.72, 0.99))]}
    pick = sweep.pick_setting(one, reference_valid={1: 1.0})
    assert pick["run"] == "b" and pick["validation"]["1"]["judge_score"] == 0.75
    assert pick["settings"] == {"pref_lr": 1e-4, "pref_steps": 50}
    # None keeps 0.9 x 1.2: the one whose validity is closest to the floor.
    closest = sweep.pick_setting(one, reference_valid={1: 1.2})
    assert closest["validation"]["1"]["valid_rate"] == 0.99
    # Two references: a is best on the first but worst on the second; b is good on both, so its
    # worst case (0.70) beats a's (0.50).
    two = {
        1: [run("a", (50, 0.95, 0.95)), run("b", (50, 0.80, 0.95))],
        2: [run("a", (50, 0.50, 0.95)), run("b", (50, 0.70, 0.95))],
    }
    pick = sweep.pick_setting(two, reference_valid={1: 1.0, 2: 1.0})
    assert pick["run"] == "b"
    assert pick["validation"] == {"1": two[1][1]["points"][0], "2": two[2][1]["points"][0]}
    # Each reference's own floor: 0.9 x 0.8 on the second lets a point of valid rate 0.75 in there.
    low = {1: [run("a", (50, 0.95, 0.95)), run("b", (50, 0.60, 0.95))],
           2: [run("a", (50, 0.90, 0.75)), run("b", (50, 0.60, 0.95))]}
    assert sweep.pick_setting(low, reference_valid={1: 1.0, 2: 0.8})["run"] == "a"
    assert sweep.pick_setting(low, reference_valid={1: 1.0, 2: 1.0})["run"] == "b"


def test_pick_at_kl_takes_the_fluent_point_nearest_the_target_kl_on_a_log_scale():
    def run(tag, *points):
        return {
            "tag": tag,
            "overrides": {},
            "points": [{"step": s, "kl_from_reference": kl, "valid_rate": v, "judge_score": 0.5}
                       for s, kl, v in points],
        }

    runs = {1: [run("a", (50, 0.4, 1.0), (100, 1.6, 1.0), (150, 0.9, 0.5))],
            2: [run("a", (50, 0.6, 1.0), (100, 2.4, 1.0), (150, 1.1, 0.5))]}
    # mean 1.0
    target = {"validation": {"1": {"kl_from_reference": 0.8}, "2": {"kl_from_reference": 1.2}}}
    # Mean KLs 0.5, 2.0 and 1.0: step 150 matches, but is not fluent; 0.5 and 2.0 are equally far
    # on a log scale, and the first found is kept.
    pick = sweep.pick_at_kl(runs, {1: 1.0, 2: 1.0}, target)
    assert pick["settings"] == {"pref_steps": 50}
    target["validation"]["2"]["kl_from_reference"] = 2.4  # mean 1.6: nearer 2.0 than 0.5
    assert sweep.pick_at_kl(runs, {1: 1.0, 2: 1.0}, target)["settings"] == {"pref_steps": 100}


def test_grid_edges_name_each_knob_at_its_extreme_along_the_pick_s_line_and_the_end_steps():
    lrs = (2e-5, 6e-5, 1.8e-4)
    fpo_knobs = ((2.0, 4.0), (2.0, 16.0), (4.0, 16.0))
    fpo_grid = [{"method": "fpo", "beta": beta, "alpha": alpha, "pref_lr": lr}
                for beta, alpha in fpo_knobs for lr in lrs]
    dpo_grid = [{"method": "dpo", "beta": beta, "pref_lr": lr}
                for beta in (0.05, 0.1, 0.3) for lr in lrs]
    pref_cfg = config.PreferenceConfig(pref_steps=150)  # judged every 50 steps, to 300
    top = {"method": "fpo", "beta": 4.0, "alpha": 16.0, "pref_lr": 1.8e-4, "pref_steps": 300}
    # At beta 4 the grid has no other alpha: alpha 16 is not an edge there.
    assert sweep.grid_edges(top, fpo_grid, 50, pref_cfg) == [
        "largest beta", "largest pref_lr", "last judged step"
    ]
    # Nor is beta 2 at alpha 4, but alpha 4 is the smallest alpha at beta 2.
    corner = top | {"beta": 2.0, "alpha": 4.0, "pref_lr": 6e-5, "pref_steps": 100}
    assert sweep.grid_edges(corner, fpo_grid, 50, pref_cfg) == ["smallest alpha"]
    middle = {"method": "dpo", "beta": 0.1, "pref_lr": 6e-5, "pref_steps": 100}
    assert sweep.grid_edges(middle, dpo_grid, 50, pref_cfg) == []
    low = middle | {"beta": 0.05, "pref_lr": 2e-5, "pref_steps": 50}
    assert sweep.grid_edges(low, dpo_grid, 50, pref_cfg) == [
        "smallest beta", "smallest pref_lr", "first judged step"
    ]
    # One setting past both edges brackets neither: only the pick's own lines count.
    extended = dpo_grid + [{"method": "dpo", "beta": 0.02, "pref_lr": 6.7e-6}]
    assert sweep.grid_edges(low, extended, 50, pref_cfg) == [
        "smallest beta", "smallest pref_lr", "first judged step"
    ]
    extended += [{"method": "dpo", "beta": 0.05, "pref_lr": 6.7e-6}]
    assert sweep.grid_edges(low, extended, 50, pref_cfg) == [
        "smallest beta", "first judged step"
    ]


def test_the_pick_is_the_best_worst_case_not_the_best_mean():
    """a is better on average (0.775 against 0.70) but worse at worst (0.60 against 0.70): the
    robust pick is b."""
    def run(tag, score):
        return {"tag": tag, "overrides": {"pref_lr": 1e-4},
                "points": [{"step": 50, "judge_score": score, "valid_rate": 1.0}]}

    runs = {1: [run("a", 0.95), run("b", 0.70)], 2: [run("a", 0.60), run("b", 0.70)]}
    assert sweep.pick_setting(runs, reference_valid={1: 1.0, 2: 1.0})["run"] == "b"


def test_a_run_ends_at_its_first_point_below_the_floor_and_a_pick_needs_every_reference():
    """The sweep stops a run at its first point below VALIDITY_FLOOR x its reference's valid rate
    and reads a run saved whole the same way (fluent_points); a (setting, length) one reference
    never reached cannot be picked, however well it does on the others."""
    points = [{"step": step, "valid_rate": valid, "judge_score": 0.5}
              for step, valid in ((50, 0.95), (100, 0.85), (150, 0.97))]
    # The floor is 0.9 x 1.0: step 100 is the first below it; step 150 recovers, too late.
    assert sweep.fluent_points(points, {"valid_rate": 1.0}) == points[:2]
    # 0.9 x 0.9 = 0.81: every point is fluent.
    assert sweep.fluent_points(points, {"valid_rate": 0.9}) == points

    def run(tag, *points):
        return {"tag": tag, "overrides": {"pref_lr": 1e-4},
                "points": [{"step": s, "judge_score": j, "valid_rate": v} for s, j, v in points]}

    runs = {1: [run("a", (50, 0.60, 1.0), (100, 0.99, 1.0)),
                run("b", (50, 0.70, 1.0), (100, 0.80, 1.0))],
            2: [run("a", (50, 0.60, 0.5)),  # stopped here
                run("b", (50, 0.70, 1.0), (100, 0.75, 1.0))]}
    pick = sweep.pick_setting(runs, reference_valid={1: 1.0, 2: 1.0})
    assert pick["run"] == "b" and pick["settings"]["pref_steps"] == 100
    assert [c["run"] for c in sweep.grid_points(runs)] == ["a", "b", "b"]
