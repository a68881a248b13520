"""Data for FPO: a byte-level BPE tokenizer, a toy preference world with a judge,
loaders for a user's own files, and batching of preference pairs.

Token layout shared by pretraining and preference training (EOS doubles as BOS):
    [EOS] prompt response [EOS]
A pretraining document is exactly prompt + response (see `format_document`), and
`corpus_token_stream` puts one EOS between documents, so both stages see the same layout.

Run `python data.py` to regenerate tokenizer.bpe from the toy corpus (deterministic).
"""

import base64
import codecs
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained here, run by tiktoken

EOS_TOKEN = "<|eos|>"
TOKENIZER_PATH = Path(__file__).with_name("tokenizer.bpe")
TOKENIZER_VOCAB_SIZE = 1000   # an upper bound: training stops once every toy word is one token
TOKENIZER_CORPUS_DOCS = 4000  # enough documents that every toy word occurs many times
# GPT-2-like pre-tokenisation: merges never cross these pieces, so " soup" and " ." stay apart.
PRETOKENIZE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[a-zA-Z]+| ?[0-9]+| ?[^\sa-zA-Z0-9]+|\s+(?!\S)|\s+"""
)


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Train byte-level BPE; return tiktoken mergeable ranks (all 256 bytes, then merges in order).

    Counts pairs over the unique pre-tokens (tuples of byte strings, weighted by frequency), not
    the raw text. Each step merges the most frequent adjacent pair (ties: the smallest in byte
    order), until vocab_size or no pair is left. A merge whose bytes are already a token takes no
    new rank (tiktoken looks tokens up by their bytes, so a token must appear once).

    Example: train_bpe("aaabdaaabac", 259) adds b"aa", then b"ab" (tie with (b"aa", b"a")
    broken by byte order), then b"aaab", with ranks 256, 257, 258.
    """
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8"))
                    for piece in re.findall(PRETOKENIZE_PATTERN, text))
    while len(ranks) < vocab_size:
        pair_counts = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        words = Counter({_merge_pair(word, best, merged): count for word, count in words.items()})
    return ranks


def _merge_pair(word: tuple, pair: tuple, merged: bytes) -> tuple:
    """Replace every left-to-right occurrence of `pair` in `word` by `merged`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def save_ranks(ranks: dict[bytes, int], path=TOKENIZER_PATH) -> None:
    """Write ranks in tiktoken's text format: base64 token, space, rank; one per line."""
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def load_tokenizer(path=TOKENIZER_PATH) -> tiktoken.Encoding:
    """Build the tiktoken Encoding from a ranks file; reads only the local file (no network)."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="fpo-toy-bpe",
        pat_str=PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: len(ranks)},
    )


def eos_id(enc: tiktoken.Encoding) -> int:
    """Id of EOS_TOKEN (enc.eot_token only knows tiktoken's '<|endoftext|>' name)."""
    return enc.encode_single_token(EOS_TOKEN)


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text; a literal "<|eos|>" in the text is plain text, never the special token."""
    return enc.encode_ordinary(text)

# ----------------------------------------------------------------------------------------------
# Toy preference world: a small grammar of reviews with latent topic and sentiment

# Nouns are unique across topics, so a noun names its topic. SPLIT_NOUNS: training pairs use
# each topic's first 7 nouns (its first line below), validation the 8th, test the last 2, in
# prompts and responses alike. Pretraining text, which holds no preference, uses every noun, so
# the reference knows them all.
TOPICS = {
    "food":     ["soup", "pizza", "salad", "burger", "curry", "pasta", "sandwich",
                 "cake", "pie", "steak"],
    "music":    ["guitar", "album", "concert", "song", "band", "piano", "singer",
                 "drummer", "violin", "choir"],
    "travel":   ["hotel", "flight", "beach", "train", "cruise", "resort", "airport",
                 "museum", "tour", "island"],
    "books":    ["novel", "poem", "author", "chapter", "story", "biography", "library",
                 "sequel", "plot", "magazine"],
    "movies":   ["film", "actor", "director", "trailer", "cinema", "comedy", "thriller",
                 "script", "scene", "soundtrack"],
    "sports":   ["match", "stadium", "coach", "referee", "marathon", "team", "goal",
                 "race", "tournament", "game"],
    "tech":     ["laptop", "phone", "tablet", "keyboard", "printer", "camera", "charger",
                 "screen", "router", "headset"],
    "home":     ["sofa", "lamp", "kitchen", "garden", "bed", "carpet", "curtain",
                 "shower", "balcony", "fridge"],
    "clothing": ["jacket", "shirt", "dress", "boot", "sweater", "scarf", "hat",
                 "coat", "sneaker", "glove"],
    "nature":   ["forest", "river", "mountain", "lake", "waterfall", "meadow", "canyon",
                 "sunset", "trail", "valley"],
    "games":    ["puzzle", "chess", "quest", "level", "console", "controller", "dungeon",
                 "arcade", "villain", "joystick"],
    "pets":     ["dog", "cat", "puppy", "kitten", "parrot", "hamster", "rabbit",
                 "pony", "goldfish", "turtle"],
}
SPLIT_NOUNS = {"train": slice(0, 7), "validation": slice(7, 8), "test": slice(8, 10)}  # per topic
POSITIVE_ADJECTIVES = ["great", "wonderful", "excellent", "lovely", "amazing", "fantastic",
                       "superb", "delightful", "charming", "brilliant", "pleasant", "perfect",
                       "beautiful", "fun", "impressive", "enjoyable", "splendid", "marvelous",
                       "terrific", "cozy"]
NEGATIVE_ADJECTIVES = ["awful", "terrible", "boring", "dull", "horrible", "bland", "disappointing",
                       "poor", "dreadful", "annoying", "mediocre", "ugly", "noisy", "broken",
                       "messy", "clumsy", "tedious", "unpleasant", "lousy", "shabby"]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored", "admired", "praised"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted", "avoided", "resented", "dreaded"]
INTENSIFIERS = ["very", "really", "quite", "truly", "rather", "so", "extremely"]
# One sentiment slot ({adj} or {verb}) per template; "{intens} " is optional (see _expand).
SENTENCE_TEMPLATES = ["the {noun} was {intens} {adj} .", "i found the {noun} {intens} {adj} .",
                      "the {noun} felt {intens} {adj} .", "we {verb} the {noun} .",
                      "my friends {verb} the {noun} ."]
PROMPT_TEMPLATES = ["review the {noun} :", "tell me about the {noun} :",
                    "what did you think of the {noun} ?", "describe the {noun} :",
                    "how was the {noun} ?", "give your opinion of the {noun} :",
                    "write a review of the {noun} :", "what about the {noun} ?"]
MAX_SENTENCES = 4  # the longest response the world produces; the judge rejects longer ones
CHOSEN_LENGTHS = [4, 4, 2, 0]    # relative odds of 1..4 sentences: mean 1.8
REJECTED_LENGTHS = [1, 3, 3, 3]  # mean 2.8
JUDGE_FLOOR = 0.1  # the judge's lowest score of a valid response; an invalid one scores 0

NOUN_TOPIC = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}
WORD_SENTIMENT = {**{w: True for w in POSITIVE_ADJECTIVES + POSITIVE_VERBS},
                  **{w: False for w in NEGATIVE_ADJECTIVES + NEGATIVE_VERBS}}
SLOT_WORDS = {"{noun}": set(NOUN_TOPIC), "{intens}": set(INTENSIFIERS),
              "{adj}": set(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES),
              "{verb}": set(POSITIVE_VERBS + NEGATIVE_VERBS)}


def _expand(template: str) -> list[list[str]]:
    """Split a template into words; one variant with the intensifier slot, one without."""
    words = template.split(" ")
    return [words, [w for w in words if w != "{intens}"]] if "{intens}" in words else [words]


SENTENCE_FORMS = [form for template in SENTENCE_TEMPLATES for form in _expand(template)]
PROMPT_FORMS = [template.split(" ") for template in PROMPT_TEMPLATES]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class JudgeResult:
    score: float       # 0 when invalid, else in [JUDGE_FLOOR, 1]
    valid: bool
    reason: str        # "ok" or why the response is invalid
    n_sentences: int   # 0 when invalid
    on_topic: float    # fraction of sentences about the prompt's topic (0 when invalid)
    positive: float    # fraction of positive sentences (0 when invalid)


def format_document(prompt: str, response: str) -> str:
    """Pretraining text of one example: exactly prompt + response (response starts with a space)."""
    return prompt + response


def split_nouns(split: str) -> dict[str, list[str]]:
    """Each topic's nouns in a split ("train", "validation", "test"; "all": every noun)."""
    if split == "all":
        return TOPICS
    if split not in SPLIT_NOUNS:
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    return {topic: nouns[SPLIT_NOUNS[split]] for topic, nouns in TOPICS.items()}


def split_prompts(split: str) -> list[str]:
    """All distinct prompts of a split: every template with every noun of the split."""
    return [template.format(noun=noun) for template in PROMPT_TEMPLATES
            for nouns in split_nouns(split).values() for noun in nouns]


def _sentence(rng: random.Random, nouns: list[str], positive: bool) -> str:
    """One sentence about one of `nouns` with the given sentiment, ending in " ."."""
    form = rng.choice(SENTENCE_FORMS)
    fills = {"{noun}": rng.choice(nouns), "{intens}": rng.choice(INTENSIFIERS),
             "{adj}": rng.choice(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES),
             "{verb}": rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS)}
    return " ".join(fills.get(word, word) for word in form)


def _response(
    rng: random.Random,
    prompt_topic: str,
    attributes: list[tuple[bool, bool]],
    nouns: dict[str, list[str]],
) -> str:
    """A response with one distinct sentence per (on_topic, positive), using only `nouns` (a
    split_nouns dict); starts with a space."""
    sentences = []
    off_topics = [t for t in TOPICS if t != prompt_topic]
    for on_topic, positive in attributes:
        while True:
            topic = prompt_topic if on_topic else rng.choice(off_topics)
            sentence = _sentence(rng, nouns[topic], positive)
            if sentence not in sentences:
                break
        sentences.append(sentence)
    return "".join(" " + s for s in sentences)


def _match(form: list[str], words: list[str]) -> dict[str, str] | None:
    """Slot fills if `words` fit the template `form` word for word, else None."""
    if len(form) != len(words):
        return None
    fills = {}
    for f, w in zip(form, words):
        if f in SLOT_WORDS and w in SLOT_WORDS[f]:
            fills[f] = w
        elif f != w:
            return None
    return fills


def _prompt_topic(prompt: str) -> str | None:
    """The topic a toy-world prompt names, or None if the prompt is not one of PROMPT_FORMS."""
    for form in PROMPT_FORMS:
        fills = _match(form, prompt.strip().split(" "))
        if fills is not None:
            return NOUN_TOPIC[fills["{noun}"]]
    return None


def make_corpus(n_docs: int, seed: int) -> list[str]:
    """Pretraining documents from every prompt (both splits), with neutral responses:
    1-4 sentences, each on/off topic and positive/negative with probability 1/2, so the
    pretrained model has no preference that preference training would later teach."""
    rng = random.Random(f"corpus-{seed}")
    prompts = split_prompts("all")
    docs = []
    for _ in range(n_docs):
        prompt = rng.choice(prompts)
        attributes = [(rng.random() < 0.5, rng.random() < 0.5) for _ in range(rng.randint(1, 4))]
        response = _response(rng, _prompt_topic(prompt), attributes, TOPICS)
        docs.append(format_document(prompt, response))
    return docs


def make_preference_pairs(n: int, seed: int, split: str = "train") -> list[PreferencePair]:
    """Pairs on the split's prompts. Chosen: all sentences on topic and positive. Rejected: each
    sentence off topic, negative, or both (mixed within a response). Rejected is longer on average
    (CHOSEN_LENGTHS against REJECTED_LENGTHS): a length trap for losses on summed log-probs. The
    lengths overlap, so stopping early alone cannot tell chosen from rejected."""
    rng = random.Random(f"pairs-{split}-{seed}")
    prompts = split_prompts(split)
    nouns = split_nouns(split)
    bad_attributes = [(True, False), (False, True), (False, False)]
    pairs = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        topic = _prompt_topic(prompt)
        n_chosen = rng.choices(range(1, MAX_SENTENCES + 1), weights=CHOSEN_LENGTHS)[0]
        n_rejected = rng.choices(range(1, MAX_SENTENCES + 1), weights=REJECTED_LENGTHS)[0]
        chosen = _response(rng, topic, [(True, True)] * n_chosen, nouns)
        rejected_attributes = [rng.choice(bad_attributes) for _ in range(n_rejected)]
        rejected = _response(rng, topic, rejected_attributes, nouns)
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def make_prompts(n: int, seed: int, split: str = "test") -> list[str]:
    """n distinct prompts of the split for generation-based evaluation, in a seeded order;
    n = 0: all of them (192 in "test", 96 in "validation")."""
    prompts = split_prompts(split)
    if n > len(prompts):
        raise ValueError(f"the {split} split has {len(prompts)} distinct prompts, asked for {n}")
    random.Random(f"prompts-{split}-{seed}").shuffle(prompts)
    return prompts[: n or len(prompts)]


def _parse_sentence(words: list[str]) -> tuple[str, bool] | None:
    """(topic, positive) of one sentence given as words ending in ".", or None."""
    for form in SENTENCE_FORMS:
        fills = _match(form, words)
        if fills is not None:
            sentiment_word = fills.get("{adj}") or fills["{verb}"]
            return NOUN_TOPIC[fills["{noun}"]], WORD_SENTIMENT[sentiment_word]
    return None


def judge(prompt: str, response: str, complete: bool = True) -> JudgeResult:
    """Score a response to a toy-world prompt; deterministic.

    Valid only if: complete (a sampled response must have ended with EOS, not been cut off at the
    length cap, even where the cut falls after a " ."); non-empty; words separated by single
    spaces (leading/trailing whitespace is ignored); every sentence ends with " ." and parses
    under SENTENCE_TEMPLATES; at most MAX_SENTENCES sentences; no sentence repeated. Invalid text
    scores 0. Valid text scores JUDGE_FLOOR + (1 - JUDGE_FLOOR) * mean over sentences of
    (0.5 * on_topic + 0.5 * positive), so any valid response beats any invalid one and
    length alone earns nothing. Example: " the soup was great ." for "review the pizza :"
    scores 1.0; " the guitar was dull ." scores 0.1.
    Raises ValueError if the prompt is not a toy-world prompt.
    """
    if not complete:
        return _invalid("cut off before EOS")
    topic = _prompt_topic(prompt)
    if topic is None:
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    words = response.strip().split(" ")
    if words == [""]:
        return _invalid("empty response")
    if "" in words:
        return _invalid("irregular spacing")
    if words[-1] != ".":
        return _invalid("last sentence not terminated")
    sentences, start = [], 0
    for i, word in enumerate(words):
        if word == ".":
            sentences.append(words[start:i + 1])
            start = i + 1
    if len(sentences) > MAX_SENTENCES:
        return _invalid(f"more than {MAX_SENTENCES} sentences")
    if len({tuple(s) for s in sentences}) < len(sentences):
        return _invalid("repeated sentence")
    parsed = [_parse_sentence(s) for s in sentences]
    if None in parsed:
        return _invalid(f"sentence {parsed.index(None) + 1} does not parse")
    on_topic = sum(t == topic for t, _ in parsed) / len(parsed)
    positive = sum(p for _, p in parsed) / len(parsed)
    score = JUDGE_FLOOR + (1 - JUDGE_FLOOR) * (0.5 * on_topic + 0.5 * positive)
    return JudgeResult(score, True, "ok", len(parsed), on_topic, positive)


def _invalid(reason: str) -> JudgeResult:
    return JudgeResult(score=0.0, valid=False, reason=reason, n_sentences=0, on_topic=0.0,
                       positive=0.0)

# ----------------------------------------------------------------------------------------------
# Loaders for a user's own data: every fault is a DataError naming file, line, problem


class DataError(Exception):
    """A fault in a data file. str(): "data/prefs.jsonl, line 3: 'chosen' is missing"."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # pickle (a child's exception sent to its parent) rebuilds it from these, not the message
        return type(self), (self.path, self.line, self.problem)


def _read_bytes(path) -> bytes:
    """The file's bytes, without the UTF-8 byte order mark (legal UTF-8) some editors put first."""
    try:
        return Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise DataError(path, line=None, problem=f"cannot read file ({e.strerror})") from None


def load_corpus(path) -> list[str]:
    """Pretraining documents from a UTF-8 text file; documents are separated by blank lines
    and stripped of surrounding whitespace. Errors: unreadable, binary (NUL byte or invalid
    UTF-8, with line and byte offset), or empty (whitespace only)."""
    data = _read_bytes(path)
    if b"\0" in data:
        offset = data.index(b"\0")
        problem = f"NUL byte at byte offset {offset}: binary file, expected UTF-8 text"
        raise DataError(path, line=data.count(b"\n", 0, offset) + 1, problem=problem)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"not valid UTF-8 (byte offset {e.start})"
        raise DataError(path, line=data.count(b"\n", 0, e.start) + 1, problem=problem) from None
    docs = [doc.strip() for doc in re.split(r"\n[ \t\r]*\n", text) if doc.strip()]
    if not docs:
        raise DataError(path, line=None, problem="file is empty (no documents)")
    return docs


def _parse_preference_line(raw: bytes) -> PreferencePair:
    """One JSONL row -> PreferencePair; raises ValueError with the problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start} of the line)") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise ValueError(f"'{field}' is missing")
        if not isinstance(row[field], str):
            raise ValueError(f"'{field}' must be a string, got {type(row[field]).__name__}")
    for field in ("chosen", "rejected"):
        if not row[field].strip():
            raise ValueError(f"'{field}' is empty")
    if row["chosen"] == row["rejected"]:
        raise ValueError("'chosen' and 'rejected' are identical")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"])


def split_preference_file(
    path,
    skip_bad_rows: bool,
    n_test_pairs: int,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train pairs, held-out pairs) of a JSONL file: its last n_test_pairs rows, at most a fifth,
    are held out."""
    pairs, dropped = load_preferences(path, skip_bad_rows=skip_bad_rows)
    if dropped:
        print(f"data: dropped {dropped} malformed rows of {path} (--skip_bad_rows)")
    n_test = min(n_test_pairs, len(pairs) // 5)
    if n_test < 1:
        problem = (
            f"{len(pairs)} valid pairs and --n_test_pairs {n_test_pairs} leave no held-out "
            "pair; at least 5 pairs are needed (at most every fifth is held out)"
        )
        raise DataError(path, line=None, problem=problem)
    return pairs[: len(pairs) - n_test], pairs[len(pairs) - n_test:]


def load_preferences(path, skip_bad_rows: bool = False) -> tuple[list[PreferencePair], int]:
    """Preference pairs from JSONL: one {"prompt", "chosen", "rejected"} object of strings per
    line; blank lines are ignored. Returns (pairs, n_dropped). A bad row raises DataError, or
    with skip_bad_rows=True is dropped and counted. No rows, or no good row, always raises."""
    pairs, n_rows, first_fault = [], 0, None
    for line_number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not raw.strip():
            continue
        n_rows += 1
        try:
            pairs.append(_parse_preference_line(raw))
        except ValueError as e:
            fault = DataError(path, line_number, str(e))
            if not skip_bad_rows:
                raise fault from None
            first_fault = first_fault or fault
    if n_rows == 0:
        raise DataError(path, line=None, problem="file is empty (no rows)")
    if not pairs:
        raise DataError(path, line=None, problem=f"all {n_rows} rows are bad; first: {first_fault}")
    return pairs, n_rows - len(pairs)

# ----------------------------------------------------------------------------------------------
# Batching: pretraining token stream, preference pairs with response masks


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]    # without the leading EOS (collate_pairs adds it)
    chosen_ids: list[int]    # ends with EOS unless truncated from the right
    rejected_ids: list[int]  # ends with EOS unless truncated from the right


def tokenize_pairs(
    pairs: list[PreferencePair],
    enc: tiktoken.Encoding,
    block_size: int,
) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Tokenize pairs so [EOS] + prompt + response fits block_size for both responses.

    Truncation: the prompt first, from the left (its end, next to the response, is kept);
    if even an empty prompt leaves no room, responses are cut from the right (losing their
    EOS). Both sides share the same prompt. A pair is dropped where a response would keep zero
    tokens ("no room"), or where the cut leaves chosen and rejected the same tokens
    ("identical": such a pair can teach nothing). Returns (tokenized pairs, {reason: count}).
    """
    eos = eos_id(enc)
    tokenized = []
    dropped = {"no room": 0, "identical": 0}
    for pair in pairs:
        prompt = encode(enc, pair.prompt)
        chosen, rejected = encode(enc, pair.chosen) + [eos], encode(enc, pair.rejected) + [eos]
        prompt_room = block_size - 1 - max(len(chosen), len(rejected))
        if prompt_room > 0:
            prompt = prompt[-prompt_room:]  # keeps the prompt's end
        else:
            prompt = []
            chosen, rejected = chosen[:block_size - 1], rejected[:block_size - 1]
        if not chosen or not rejected:
            dropped["no room"] += 1
        elif chosen == rejected:
            dropped["identical"] += 1
        else:
            tokenized.append(TokenizedPair(prompt, chosen, rejected))
    return tokenized, dropped


def collate_responses(
    prompts: list[list[int]],
    responses: list[list[int]],
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompt/response rows into one batch: each row is [EOS] + prompt + response,
    right-padded with EOS to the longest row.

    Returns input_ids LongTensor (R, T) and response_mask BoolTensor (R, T), True exactly at
    response tokens (including a final EOS); False at BOS, prompt and padding.
    """
    T = max(1 + len(prompt) + len(response) for prompt, response in zip(prompts, responses))
    input_ids = torch.full((len(prompts), T), eos_id, dtype=torch.long)  # (R, T)
    response_mask = torch.zeros((len(prompts), T), dtype=torch.bool)     # (R, T)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        start, end = 1 + len(prompt), 1 + len(prompt) + len(response)
        input_ids[i, 1:end] = torch.tensor(prompt + response, dtype=torch.long)
        response_mask[i, start:end] = True
    return input_ids, response_mask


def collate_pairs(tokenized: list[TokenizedPair], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack B pairs into one batch (see collate_responses): rows 0..B-1 chosen, rows B..2B-1
    rejected. Returns input_ids (2B, T) and response_mask (2B, T)."""
    prompts = [p.prompt_ids for p in tokenized]
    chosen = [p.chosen_ids for p in tokenized]
    rejected = [p.rejected_ids for p in tokenized]
    return collate_responses(prompts + prompts, chosen + rejected, eos_id)


def pair_batch(
    tokenized: list[TokenizedPair],
    index: torch.Tensor,
    row_offset: int,
    eos_id: int,
    device,
):
    """Pairs `index` as one batch: (cache rows (2B,), input_ids (2B, T), response_mask (2B, T)),
    chosen rows first, on `device`. Pair i's chosen response is row 2i of the reference cache, its
    rejected 2i+1; held-out pairs follow the training pairs there, so their row_offset is
    len(train pairs)."""
    input_ids, mask = collate_pairs([tokenized[i] for i in index], eos_id)
    rows = torch.cat([2 * (index + row_offset), 2 * (index + row_offset) + 1])
    return rows.to(device), input_ids.to(device), mask.to(device)


def every_pair(
    tokenized: list[TokenizedPair],
    batch_size: int,
    row_offset: int,
    eos_id: int,
    device,
):
    """Every pair once, in order, as pair_batch batches."""
    for start in range(0, len(tokenized), batch_size):
        index = torch.arange(start, min(start + batch_size, len(tokenized)))
        yield pair_batch(tokenized, index, row_offset, eos_id, device)


def response_text(enc: tiktoken.Encoding, response_ids: list[int]) -> str:
    """The text of a sampled response: its tokens decoded, without the EOS that ends it."""
    return enc.decode([t for t in response_ids if t != eos_id(enc)])


def corpus_token_stream(docs: list[str], enc: tiktoken.Encoding) -> torch.Tensor:
    """All documents as one LongTensor (N,): [EOS] doc1 [EOS] doc2 ... [EOS], the same layout
    as a preference row [EOS] prompt response [EOS]."""
    eos = eos_id(enc)
    ids = [eos]
    for doc in docs:
        ids += encode(enc, doc) + [eos]
    return torch.tensor(ids, dtype=torch.long)


def contiguous_chunks(tokens: torch.Tensor, block_size: int, max_tokens: int) -> torch.Tensor:
    """The token stream cut into (N, block_size) rows, at most max_tokens tokens in all."""
    n_rows = min(len(tokens), max_tokens) // block_size
    return tokens[: n_rows * block_size].view(n_rows, block_size)


def chunk_batches(chunks: torch.Tensor, batch_size: int, device):
    """Rows of `chunks` (N, T), batch_size at a time, on `device`."""
    for start in range(0, len(chunks), batch_size):
        yield chunks[start : start + batch_size].to(device)


def lm_windows(
    tokens: torch.Tensor,
    starts: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the token stream for next-token prediction.

    tokens: the token stream, (N,); starts: where each window begins, (B,), each < N - block_size.
    Returns x (B, T) and y (B, T), y being x shifted one token left.
    """
    x = torch.stack([tokens[s:s + block_size] for s in starts.tolist()])          # (B, T)
    y = torch.stack([tokens[s + 1:s + 1 + block_size] for s in starts.tolist()])  # (B, T)
    return x, y


if __name__ == "__main__":
    corpus_text = "\n".join(make_corpus(TOKENIZER_CORPUS_DOCS, seed=0))
    ranks = train_bpe(corpus_text, TOKENIZER_VOCAB_SIZE)
    save_ranks(ranks)
    print(f"wrote {TOKENIZER_PATH} with {len(ranks)} tokens (+1 special: {EOS_TOKEN})")
