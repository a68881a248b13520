"""Tests for data.py: tokenizer, toy world and judge, loaders, batching. CPU, a few seconds."""

import json
import socket
import statistics
import sys
from pathlib import Path

import pytest
import tiktoken
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return data.load_tokenizer()


def split_document(doc):
    """A toy document back into (prompt, response): prompts end with ':' or '?'."""
    end = min(i for i in (doc.find(":"), doc.find("?")) if i >= 0) + 1
    return doc[:end], doc[end:]

# ---- tokenizer ----


def test_train_bpe_hand_worked_example():
    # Pairs of "aaabdaaabac": aa x4 -> merge; then (aa,a) and (a,b) tie at 2, byte order picks
    # (a,b); then (aa,ab) x2 -> "aaab".
    ranks = data.train_bpe("aaabdaaabac", vocab_size=259)
    assert {t: r for t, r in ranks.items() if r >= 256} == {b"aa": 256, b"ab": 257, b"aaab": 258}
    assert all(ranks[bytes([b])] == b for b in range(256))
    enc = tiktoken.Encoding(
        name="t",
        pat_str=data.PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={},
    )
    assert enc.encode_ordinary("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_train_bpe_stops_at_vocab_size():
    assert len(data.train_bpe("the cat sat on the mat " * 10, vocab_size=260)) == 260


def test_shipped_tokenizer_is_what_training_regenerates(tmp_path):
    text = "\n".join(data.make_corpus(n_docs=data.TOKENIZER_CORPUS_DOCS, seed=0))
    data.save_ranks(data.train_bpe(text, data.TOKENIZER_VOCAB_SIZE), tmp_path / "t.bpe")
    assert (tmp_path / "t.bpe").read_text() == data.TOKENIZER_PATH.read_text()


def test_vocab_size_and_eos(enc):
    assert 600 <= enc.n_vocab <= 1001
    eos = data.eos_id(enc)
    assert eos == enc.n_vocab - 1
    assert enc.decode([eos]) == data.EOS_TOKEN
    assert eos not in data.encode(enc, "a literal <|eos|> is plain text")


@pytest.mark.parametrize("text", [
    "review the soup : the soup was very great . we hated the lamp .",
    "Ünïcödé ✓ 日本語 🙂 tabs\tand\nnewlines  and   spaces ",
    "",
])
def test_round_trip(enc, text):
    assert enc.decode(data.encode(enc, text)) == text


def test_toy_words_are_single_tokens(enc):
    words = set(data.NOUN_TOPIC) | set(data.WORD_SENTIMENT) | set(data.INTENSIFIERS)
    for form in data.SENTENCE_FORMS + [form[1:] for form in data.PROMPT_FORMS]:
        words |= {w for w in form if not w.startswith("{")}
    assert [w for w in words if len(data.encode(enc, " " + w)) != 1] == []
    # a prompt's first word starts the document, so it has no leading space
    assert all(len(data.encode(enc, form[0])) == 1 for form in data.PROMPT_FORMS)


def test_load_tokenizer_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert data.load_tokenizer().n_vocab > 256


def test_document_tokens_are_prompt_then_response_tokens(enc):
    for pair in data.make_preference_pairs(n=50, seed=0):
        doc = data.format_document(pair.prompt, pair.chosen)
        parts = data.encode(enc, pair.prompt) + data.encode(enc, pair.chosen)
        assert data.encode(enc, doc) == parts

# ---- toy world and judge ----


def test_toy_world_is_deterministic():
    assert data.make_corpus(n_docs=20, seed=1) == data.make_corpus(n_docs=20, seed=1)
    assert data.make_corpus(n_docs=20, seed=1) != data.make_corpus(n_docs=20, seed=2)
    assert data.make_preference_pairs(n=20, seed=1) == data.make_preference_pairs(n=20, seed=1)
    assert data.make_preference_pairs(n=20, seed=1) != data.make_preference_pairs(n=20, seed=2)
    assert data.make_prompts(n=20, seed=1) == data.make_prompts(n=20, seed=1)
    assert data.make_prompts(n=20, seed=1) != data.make_prompts(n=20, seed=2)


def test_corpus_is_balanced_and_valid():
    results = [data.judge(*split_document(doc)) for doc in data.make_corpus(n_docs=2000, seed=0)]
    assert all(r.valid for r in results)
    n_sentences = sum(r.n_sentences for r in results)
    on_topic = sum(r.on_topic * r.n_sentences for r in results) / n_sentences
    positive = sum(r.positive * r.n_sentences for r in results) / n_sentences
    assert 0.45 < on_topic < 0.55 and 0.45 < positive < 0.55
    for length in range(1, data.MAX_SENTENCES + 1):  # lengths 1-4 about equally often
        assert 0.2 < sum(r.n_sentences == length for r in results) / len(results) < 0.3


def test_rejected_is_longer_than_chosen(enc):
    pairs = data.make_preference_pairs(n=500, seed=0)
    chosen = statistics.mean(len(data.encode(enc, p.chosen)) for p in pairs)
    rejected = statistics.mean(len(data.encode(enc, p.rejected)) for p in pairs)
    assert rejected > 1.5 * chosen


def test_validation_and_test_words_never_in_training_pairs():
    prompts = {split: set(data.split_prompts(split)) for split in ("train", "validation", "test")}
    assert len(prompts["validation"]) == 96 and len(prompts["test"]) == 192
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    held_out = {
        noun
        for split in ("validation", "test")
        for nouns in data.split_nouns(split).values()
        for noun in nouns
    }
    assert len(held_out) == 3 * len(data.TOPICS)
    # neither in prompts nor in responses
    for pair in data.make_preference_pairs(n=2000, seed=0, split="train"):
        assert not held_out & set(f"{pair.prompt} {pair.chosen} {pair.rejected}".split()), pair
    test_nouns = {noun for nouns in data.split_nouns("test").values() for noun in nouns}
    for pair in data.make_preference_pairs(n=300, seed=0, split="test"):
        words = set(f"{pair.prompt} {pair.chosen} {pair.rejected}".split())
        assert words & set(data.NOUN_TOPIC) <= test_nouns, pair


def test_eval_prompts_are_distinct():
    prompts = data.make_prompts(n=0, seed=0, split="test")
    assert sorted(prompts) == sorted(data.split_prompts("test"))  # 0: every prompt once
    first_ten = data.make_prompts(n=10, seed=0, split="validation")
    assert first_ten == data.make_prompts(n=0, seed=0, split="validation")[:10]
    with pytest.raises(ValueError, match="the test split has 192 distinct prompts, asked for 193"):
        data.make_prompts(n=193, seed=0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_judge_prefers_chosen_on_every_pair(split):
    for pair in data.make_preference_pairs(n=300, seed=3, split=split):
        chosen = data.judge(pair.prompt, pair.chosen)
        rejected = data.judge(pair.prompt, pair.rejected)
        assert chosen.valid and rejected.valid
        assert chosen.score == 1.0 and rejected.score < chosen.score


def test_judge_hand_examples():
    prompt = "review the pizza :"
    assert data.judge(prompt, " the soup was great .").score == 1.0
    assert data.judge(prompt, "  the soup was great .\n").score == 1.0  # outer whitespace ignored
    assert data.judge(prompt, " the guitar was dull .").score == pytest.approx(0.1)
    mixed = data.judge(prompt, " we loved the cake . i found the guitar very dull .")
    assert (mixed.on_topic, mixed.positive) == (0.5, 0.5)
    assert mixed.score == pytest.approx(0.1 + 0.9 * 0.5)
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        data.judge("hello there", " the soup was great .")


@pytest.mark.parametrize("response, reason", [
    ("", "empty response"),
    ("   ", "empty response"),
    (" the the the the the the", "last sentence not terminated"),
    (" soup soup soup soup .", "sentence 1 does not parse"),
    (" the soup was great . the soup was great .", "repeated sentence"),
    (" the soup was great . we loved the", "last sentence not terminated"),
    (" great was the soup .", "sentence 1 does not parse"),
    (" we loved the cake . banana quantum the was .", "sentence 2 does not parse"),
    (" the soup was great .  we loved the cake .", "irregular spacing"),
    (" the soup was great. we loved the cake .", "sentence 1 does not parse"),
    (" the soup was great . we loved the cake . the pie was fun . the curry was lovely ."
     " we liked the salad .",
     "more than 4 sentences"),
])
def test_judge_rejects_degenerate_text(response, reason):
    result = data.judge("review the pizza :", response)
    assert (result.valid, result.score, result.reason) == (False, 0.0, reason)


# ---- batching ----


def test_collate_masks_exactly_the_response(enc):
    pairs = data.make_preference_pairs(n=8, seed=0)
    tokenized, dropped = data.tokenize_pairs(pairs, enc, block_size=64)
    assert dropped == {"no room": 0, "identical": 0}
    eos = data.eos_id(enc)
    input_ids, mask = data.collate_pairs(tokenized, eos)
    rows = [(p.prompt_ids, p.chosen_ids) for p in tokenized]
    rows += [(p.prompt_ids, p.rejected_ids) for p in tokenized]
    assert input_ids.shape == mask.shape == (16, max(1 + len(a) + len(b) for a, b in rows))
    assert input_ids.dtype == torch.long and mask.dtype == torch.bool
    for i, (prompt, response) in enumerate(rows):
        assert response[-1] == eos
        start, end = 1 + len(prompt), 1 + len(prompt) + len(response)
        assert input_ids[i, 0] == eos and input_ids[i, 1:start].tolist() == prompt
        assert input_ids[i, start:end].tolist() == response
        assert (input_ids[i, end:] == eos).all()
        assert int(mask[i].sum()) == len(response) and mask[i, start:end].all()
    assert rows[0][0] == rows[8][0]  # chosen and rejected rows share the prompt


def test_truncation_cuts_the_prompt_from_the_left_first(enc):
    pair = data.PreferencePair("one two three four five six seven eight", " yes .", " no thanks .")
    prompt = data.encode(enc, pair.prompt)
    chosen = data.encode(enc, pair.chosen)
    rejected = data.encode(enc, pair.rejected)
    block_size = 1 + 3 + len(rejected) + 1  # room for 3 prompt tokens beside the longer response
    [t], dropped = data.tokenize_pairs([pair], enc, block_size)
    assert sum(dropped.values()) == 0
    assert t.prompt_ids == prompt[-3:]
    assert t.chosen_ids == chosen + [data.eos_id(enc)]
    assert t.rejected_ids == rejected + [data.eos_id(enc)]
    input_ids, _ = data.collate_pairs([t], data.eos_id(enc))
    assert input_ids.shape[1] == block_size


def test_truncation_cuts_a_too_long_response_from_the_right(enc):
    pair = data.PreferencePair(
        prompt="review the soup :",
        chosen=" we loved the soup .",
        rejected=" the soup was awful . the pie was dull .",
    )
    [t], dropped = data.tokenize_pairs([pair], enc, block_size=6)
    assert sum(dropped.values()) == 0 and t.prompt_ids == []
    assert t.rejected_ids == data.encode(enc, pair.rejected)[:5]
    assert t.chosen_ids == (data.encode(enc, pair.chosen) + [data.eos_id(enc)])[:5]


def test_pair_with_no_room_for_a_response_is_dropped_and_counted(enc):
    pairs = data.make_preference_pairs(n=3, seed=0)
    assert data.tokenize_pairs(pairs, enc, block_size=1) == ([], {"no room": 3, "identical": 0})


def test_pair_whose_responses_become_identical_once_cut_is_dropped_and_counted(enc):
    """Chosen and rejected differ only after their first 4 tokens; a 5-token context keeps 4 of
    each (no prompt), so the pair would train on a zero logit: dropped, counted."""
    same_start = " the soup was great"
    pair = data.PreferencePair("review the soup :", same_start + " .", same_start + " and hot .")
    assert len(data.encode(enc, same_start)) == 4
    assert data.tokenize_pairs([pair], enc, block_size=5) == ([], {"no room": 0, "identical": 1})
    [kept], dropped = data.tokenize_pairs([pair], enc, block_size=64)
    assert dropped == {"no room": 0, "identical": 0} and kept.chosen_ids != kept.rejected_ids


def test_corpus_stream_and_lm_batches(enc):
    docs = data.make_corpus(n_docs=5, seed=0)
    tokens = data.corpus_token_stream(docs, enc)
    eos = data.eos_id(enc)
    assert tokens[0] == eos and tokens[-1] == eos and int((tokens == eos).sum()) == len(docs) + 1
    expected_text = data.EOS_TOKEN + data.EOS_TOKEN.join(docs) + data.EOS_TOKEN
    assert enc.decode(tokens.tolist()) == expected_text
    x, y = data.lm_windows(tokens, torch.tensor([0, 3, len(tokens) - 17]), block_size=16)
    assert x.shape == y.shape == (3, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1], tokens[3:19]) and torch.equal(y[2], tokens[-16:])

# ---- loaders ----


def test_data_error_message():
    missing = data.DataError("data/prefs.jsonl", line=3, problem="'chosen' is missing")
    assert str(missing) == "data/prefs.jsonl, line 3: 'chosen' is missing"
    empty = data.DataError("data/prefs.jsonl", line=None, problem="file is empty (no rows)")
    assert str(empty) == "data/prefs.jsonl: file is empty (no rows)"


def row(**fields):
    return json.dumps(fields).encode()


GOOD = row(prompt="p", chosen="a", rejected="b")


@pytest.mark.parametrize("lines, line, problem", [
    ([GOOD, b'{"prompt": "p", "chosen": '], 2, "invalid JSON"),
    ([b'["p", "a", "b"]'], 1, "expected a JSON object, got list"),
    ([GOOD, b"", row(prompt="p", rejected="b")], 3, "'chosen' is missing"),
    ([row(chosen="a", rejected="b")], 1, "'prompt' is missing"),
    ([row(prompt="p", chosen="a")], 1, "'rejected' is missing"),
    ([row(prompt=7, chosen="a", rejected="b")], 1, "'prompt' must be a string, got int"),
    ([row(prompt="p", chosen=None, rejected="b")], 1, "'chosen' must be a string, got NoneType"),
    ([GOOD, row(prompt="p", chosen=" \n", rejected="b")], 2, "'chosen' is empty"),
    ([row(prompt="p", chosen="a", rejected="")], 1, "'rejected' is empty"),
    ([row(prompt="p", chosen="same", rejected="same")], 1, "'chosen' and 'rejected' are identical"),
    ([GOOD, GOOD, b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}'], 3, "not valid UTF-8"),
])
def test_load_preferences_faults(tmp_path, lines, line, problem):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(data.DataError) as info:
        data.load_preferences(path)
    message = str(info.value)
    assert "prefs.jsonl" in message and f"line {line}:" in message and problem in message
    assert info.value.line == line


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_load_preferences_empty_file_raises_even_when_skipping(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for skip in (False, True):
        with pytest.raises(data.DataError, match=r"empty\.jsonl: file is empty"):
            data.load_preferences(path, skip_bad_rows=skip)


def test_load_preferences_skip_bad_rows_drops_and_counts(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join([GOOD, b"not json", b"", row(prompt="q", chosen="c", rejected="d"),
                                 b"[]", row(prompt="p", chosen="x", rejected="x")]))
    pairs, n_dropped = data.load_preferences(path, skip_bad_rows=True)
    assert pairs == [data.PreferencePair("p", "a", "b"), data.PreferencePair("q", "c", "d")]
    assert n_dropped == 3
    with pytest.raises(data.DataError, match=r"prefs\.jsonl, line 2: invalid JSON"):
        data.load_preferences(path)


def test_load_preferences_all_rows_bad_raises(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"nope\n[1]\n")
    message = r"bad\.jsonl: all 2 rows are bad; first: .*line 1: invalid JSON"
    with pytest.raises(data.DataError, match=message):
        data.load_preferences(path, skip_bad_rows=True)


def test_loaders_report_a_missing_file(tmp_path):
    for load in (data.load_corpus, data.load_preferences):
        with pytest.raises(data.DataError, match=r"missing\.txt: cannot read file"):
            load(tmp_path / "missing.txt")


def test_load_corpus_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n  \nsecond doc\r\n\r\nthird ✓\n", encoding="utf-8")
    assert data.load_corpus(path) == ["first doc\nstill first", "second doc", "third ✓"]


@pytest.mark.parametrize("content, line, problem", [
    (b"", None, "file is empty"),
    (b" \n\n\t\n", None, "file is empty"),
    (b"text\nmore\x00binary\n", 2, "NUL byte at byte offset 9"),
    (b"ok\n\nfine\nbad \xc3\x28 byte\n", 4, "not valid UTF-8 (byte offset 13)"),
])
def test_load_corpus_faults(tmp_path, content, line, problem):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as info:
        data.load_corpus(path)
    where = "corpus.txt" if line is None else f"corpus.txt, line {line}:"
    assert where in str(info.value) and problem in str(info.value) and info.value.line == line
