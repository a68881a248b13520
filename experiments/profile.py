"""Where an experiment's time goes: a cProfile of one run of it, summed into the parts
docs/cost.md tabulates.

    python -m cProfile -o control.prof -m experiments --control --seeds 1 --threads 1
    python -m experiments.profile control.prof [more.prof ...]

Each part is the time spent inside its functions, less what they spend in other parts (the
sweep's judging runs inside its training loop), in seconds and as a share of the whole; "the
rest" is start-up, imports, loading and checks. Runs in --workers processes or in child
processes are not seen by the parent's profile: profile with --workers 1, and read --compare's
training as "runs in child processes".
"""

import pstats
import sys

PARTS = {  # part: (file name, function name), ...
    "pretraining references": (("train.py", "pretrain"),),
    "training SAEs": (("train.py", "train_sae_stage"),),
    "building reference caches": (("fpo.py", "build_reference_cache"),),
    "preference training": (("train.py", "train_preference"), ("common.py", "train_policy")),
    "runs in child processes": (("common.py", "in_child_process"),),
    "sampling": (("evaluate.py", "sample_responses"),),
    # sample_stats samples again at temperature 1 for the KL: that counts as sampling
    "scoring samples (KL, entropy, judge)": (("evaluate.py", "score_samples"),
                                             ("evaluate.py", "judge_stats")),
    "held-out and training accuracy": (("train.py", "held_out_accuracy"),
                                       ("paper.py", "training_accuracy")),
    "writing tables and figures": (("common.py", "write_outputs"),),
}
INSIDE = {  # part: functions it calls whose time belongs to other parts
    "preference training": (("common.py", "judged_in_place"),),
}


def parts(path: str) -> tuple[float, dict[str, float]]:
    """The profile's total seconds and {part: seconds}, "the rest" last."""
    stats = pstats.Stats(path).stats  # {(file, line, function): (..., cumulative seconds, ...)}
    total = max(entry[3] for entry in stats.values())

    def spent(functions) -> float:
        return sum(
            entry[3] for (file, _, function), entry in stats.items()
            if any(file.endswith("/" + name) and function == wanted for name, wanted in functions)
        )

    seconds = {
        part: spent(functions) - spent(INSIDE.get(part, ())) for part, functions in PARTS.items()
    }
    seconds["the rest"] = total - sum(seconds.values())
    return total, seconds


def main(paths: list[str]) -> None:
    for path in paths:
        total, seconds = parts(path)
        print(f"\n{path}: {total:.0f} s\n\n| part | seconds | share |\n|---|---|---|")
        for part, spent in seconds.items():
            if spent >= 0.05:
                print(f"| {part} | {spent:.1f} | {spent / total:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
