"""The task: the DPO paper's controlled sentiment generation (Sec. 6.1), made offline.

A prompt asks for a short review of a product, a place or a film; the judge is VADER
(Hutto and Gilbert 2014, the `vaderSentiment` package), a lexicon-based sentiment analyser
whose compound score runs from -1 (most negative) to +1 (most positive). Preference pairs come
from the model's own samples: of one prompt's samples, the most positive is chosen and the least
positive rejected, when their compound scores differ by at least a minimum gap.

Splits are by subject: a validation or test prompt never names a subject a training prompt names.
"""

import random
from dataclasses import dataclass

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

TEMPLATES = (
    "Write a short review of the {}.",
    "Write a one-sentence review of the {}.",
    "In a few words, review the {}.",
)
SUBJECTS = (
    # products
    "headphones", "laptop", "coffee maker", "backpack", "smartphone", "blender",
    "running shoes", "desk lamp", "umbrella", "toaster", "electric kettle", "office chair",
    "wristwatch", "camera", "vacuum cleaner", "board game", "water bottle", "keyboard", "tent",
    "bicycle", "sunglasses", "winter coat",
    # places
    "hotel", "restaurant", "museum", "beach resort", "train station", "bakery", "library", "zoo",
    "city park", "cafe", "gym", "airport", "campsite", "bookshop", "pizzeria", "ski lodge",
    "aquarium", "theme park", "hostel", "spa", "farmers market", "food truck",
    # films
    "science fiction film", "action movie", "romantic comedy", "horror film", "documentary",
    "animated film", "western", "thriller", "musical", "war film", "fantasy epic",
    "crime drama", "superhero movie", "mystery film", "period drama", "disaster movie",
    "spy film", "family comedy", "sports film", "road movie",
)
N_HELD_OUT = {"validation": 8, "test": 16}  # subjects per held-out split; the rest train
POSITIVE = 0.05  # VADER's own threshold: a compound score of at least 0.05 is positive


@dataclass
class PreferencePair:
    """One pair, in the JSONL fields TRL's trainers and data.load_preferences read."""

    prompt: str
    chosen: str
    rejected: str


def split_subjects(split: str) -> list[str]:
    """The subjects of one split ("train", "validation" or "test"), fixed for every run.

    A fixed shuffle (seed 0) puts 8 subjects in validation, the next 16 in test, the rest (40)
    in train.
    """
    order = list(SUBJECTS)
    random.Random(0).shuffle(order)
    n_validation, n_test = N_HELD_OUT["validation"], N_HELD_OUT["test"]
    bounds = {"validation": (0, n_validation),
              "test": (n_validation, n_validation + n_test),
              "train": (n_validation + n_test, len(order))}
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(bounds)}")
    start, end = bounds[split]
    return order[start:end]


def make_prompts(split: str, n: int, seed: int) -> list[str]:
    """n distinct instructions of one split (every template times every subject, shuffled by seed;
    n = 0 or more than there are: all of them).

    Example: make_prompts("train", 2, seed=0) -> ["Write a short review of the tent.",
    "In a few words, review the hostel."] (the exact two depend on the seed).
    """
    prompts = [template.format(subject) for subject in split_subjects(split)
               for template in TEMPLATES]
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n > 0 else prompts


class Judge:
    """VADER's compound score of each text: -1 (most negative) to +1 (most positive)."""

    def __init__(self):
        self.analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(text)["compound"] for text in texts]


def rank_pair(prompt: str, completions: list[str], scores: list[float],
              min_gap: float) -> PreferencePair | None:
    """The most positive completion as chosen, the least positive as rejected, or None when their
    scores differ by less than min_gap (ties keep the earlier sample).

    Example: scores [0.1, 0.8, -0.4] with min_gap 0.5 -> chosen completions[1], rejected
    completions[2]; with min_gap 1.5 -> None.
    """
    if len(completions) != len(scores) or len(completions) < 2:
        raise ValueError(f"need at least 2 completions with one score each, got "
                         f"{len(completions)} and {len(scores)}")
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] - scores[worst] < min_gap:
        return None
    return PreferencePair(prompt=prompt, chosen=completions[best], rejected=completions[worst])


def sentiment_stats(scores: list[float]) -> dict:
    """VADER's verdict on a set of samples: the positive rate and the mean compound score."""
    return {"positive_rate": sum(score >= POSITIVE for score in scores) / len(scores),
            "mean_compound": sum(scores) / len(scores)}
