"""Data loading (files, directories, held-out split) and the built-in tasks' encoding (loss on responses only, padding masked by position)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptkit.contract.task import IGNORE
from adaptkit.data.load import load_data
from adaptkit.errors import DataError
from adaptkit.recipe.schema import DataSpec
from adaptkit.testing import tiny_tokenizer
from adaptkit_plugins.tasks import CausalLM, Classification, LanguageModeling

ROWS = [{"text": f"good movie {i}", "label": "pos" if i % 3 else "neg"} for i in range(30)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(source, host, seed: int = 0, **spec):
    return load_data(DataSpec(source=str(source), **spec), host, seed)


# -- reading files -----------------------------------------------------------------------------


def test_jsonl(tmp_path, host):
    splits, files = load(write_jsonl(tmp_path / "d.jsonl", ROWS), host, validation_size=0.2)
    assert (len(splits["train"]), len(splits["validation"])) == (24, 6)
    assert splits["train"].column_names == ["text", "label"]
    assert files["train"] == str(tmp_path / "d.jsonl")
    assert "held out 20%" in files["validation"] and "seed 0" in files["validation"]


def test_csv_and_tsv(tmp_path, host):
    (tmp_path / "d.csv").write_text('text,label\n"hello, world",pos\nbye,neg\nfine,pos\n')
    (tmp_path / "d.tsv").write_text('text\tlabel\n"quoted" words, kept\tpos\nbye\tneg\nfine\tpos\n')
    csv, _ = load(tmp_path / "d.csv", host, validation_size=0.34)
    tsv, _ = load(tmp_path / "d.tsv", host, validation_size=0.34)
    texts = sorted(list(csv["train"]["text"]) + list(csv["validation"]["text"]))
    assert texts == ["bye", "fine", "hello, world"]
    tsv_texts = sorted(list(tsv["train"]["text"]) + list(tsv["validation"]["text"]))
    assert tsv_texts == ['"quoted" words, kept', "bye", "fine"]  # quotes are text in TSV


def test_parquet(tmp_path, host):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    splits, _ = load(tmp_path / "d.parquet", host)
    assert len(splits["train"]) + len(splits["validation"]) == 30
    assert set(splits["train"]["label"]) == {"pos", "neg"}


@pytest.mark.parametrize("val_name", ["validation.jsonl", "dev.jsonl", "valid.csv"])
def test_directory_with_split_files(tmp_path, host, val_name):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:20])
    if val_name.endswith(".csv"):
        (tmp_path / val_name).write_text("text,label\nbad movie,neg\ngood movie,pos\n")
    else:
        write_jsonl(
            tmp_path / val_name,
            [{"text": "bad movie", "label": "neg"}, {"text": "good movie", "label": "pos"}],
        )
    (tmp_path / "notes.txt").write_text("ignored")
    splits, files = load(tmp_path, host)
    assert len(splits["train"]) == 20 and len(splits["validation"]) == 2  # nothing held out
    assert splits["train"]["text"] == [r["text"] for r in ROWS[:20]]  # file order kept
    assert files == {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / val_name)}


def test_directory_without_train_file(tmp_path, host):
    write_jsonl(tmp_path / "validation.jsonl", ROWS[:2])
    with pytest.raises(DataError, match="no train"):
        load(tmp_path, host)


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, host):
    rows = [{"text": f"row {i}", "label": i % 2, "id": i} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a, _ = load(path, host, seed=3, validation_size=0.2)
    b, _ = load(path, host, seed=3, validation_size=0.2)
    c, _ = load(path, host, seed=4, validation_size=0.2)
    assert a["train"]["id"] == b["train"]["id"] and a["validation"]["id"] == b["validation"]["id"]
    assert set(a["validation"]["id"]) != set(c["validation"]["id"])
    for s in (a, c):
        train, val = set(s["train"]["id"]), set(s["validation"]["id"])
        assert len(val) == 10 and not train & val and train | val == set(range(50))


def test_max_examples(tmp_path, host):
    splits, _ = load(write_jsonl(tmp_path / "d.jsonl", ROWS), host, max_train_examples=5, max_eval_examples=2)
    assert (len(splits["train"]), len(splits["validation"])) == (5, 2)


def test_file_errors_name_the_file(tmp_path, host):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load(tmp_path / "empty.jsonl", host)
    with pytest.raises(DataError, match=r"missing\.jsonl"):
        load(tmp_path / "missing.jsonl", host)
    (tmp_path / "data.txt").write_text("text\n")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'"):
        load(tmp_path / "data.txt", host)
    write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    with pytest.raises(DataError, match=r"one\.jsonl: at least 2 rows"):
        load(tmp_path / "one.jsonl", host)


def test_malformed_jsonl_row(tmp_path, host):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "oops", label: pos\n')
    with pytest.raises(DataError) as exc:
        load(path, host)
    assert str(path) in str(exc.value) and "could not be parsed" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_column_names_file_and_column(tmp_path, host):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = DataSpec(source=str(path), text="sentence")
    splits, files = load_data(spec, host, 0)
    with pytest.raises(DataError) as exc:
        Classification(spec).setup(splits, files)
    msg = str(exc.value)
    assert str(path) in msg and "'sentence'" in msg and "text" in msg


# -- classification ----------------------------------------------------------------------------


def classification(tmp_path, host, train_rows, val_rows, **spec):
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "validation.jsonl", val_rows)
    data = DataSpec(source=str(tmp_path), **spec)
    splits, files = load_data(data, host, 0)
    task = Classification(data)
    task.setup(splits, files)
    return task, splits, files


def test_string_labels(tmp_path, host):
    task, splits, files = classification(
        tmp_path, host, ROWS, [{"text": "bad", "label": "neg"}, {"text": "ok", "label": "pos"}]
    )
    assert task.names == ["neg", "pos"]
    assert task.model_kwargs()["id2label"] == {0: "neg", 1: "pos"} and task.model_kwargs()["num_labels"] == 2
    enc = task.encode(splits["validation"], tiny_tokenizer("bert"), files["validation"])
    assert enc["labels"] == [0, 1]
    batch = task.collate(tiny_tokenizer("bert"))([enc[0], enc[1]])
    assert batch["labels"].tolist() == [0, 1] and batch["input_ids"].shape == batch["attention_mask"].shape


def test_int_labels_and_labels_by_id(tmp_path, host):
    train = [{"text": "good", "label": 0}, {"text": "bad", "label": 2}, {"text": "fine", "label": 0}]
    task, splits, files = classification(
        tmp_path, host, train, [{"text": "x", "label": 1}, {"text": "y", "label": 2}]
    )
    assert task.names == ["0", "1", "2"]  # ids up to the largest, even one absent from train
    assert task.encode(splits["validation"], tiny_tokenizer("bert"), files["validation"])["labels"] == [1, 2]


def test_declared_label_names(tmp_path, host):
    task, splits, files = classification(
        tmp_path,
        host,
        ROWS,
        [{"text": "a", "label": "pos"}, {"text": "b", "label": 0}],
        labels=["pos", "neg", "meh"],
    )
    assert task.names == ["pos", "neg", "meh"]
    assert task.encode(splits["validation"], tiny_tokenizer("bert"), files["validation"])["labels"] == [0, 0]


@pytest.mark.parametrize("bad", ["neutral", 7, -1])
def test_unknown_label_names_file_row_and_column(tmp_path, host, bad):
    train = (
        [{"text": "good", "sentiment": "pos"}, {"text": "bad", "sentiment": "neg"}]
        if bad != 7 and bad != -1
        else [{"text": "good", "sentiment": 0}, {"text": "bad", "sentiment": 1}]
    )
    ok = train[0]["sentiment"]
    val = [{"text": "a", "sentiment": ok}, {"text": "b", "sentiment": ok}, {"text": "c", "sentiment": bad}]
    task, splits, files = classification(tmp_path, host, train, val, label="sentiment")
    task.encode(splits["train"], tiny_tokenizer("bert"), files["train"])
    with pytest.raises(DataError) as exc:
        task.encode(splits["validation"], tiny_tokenizer("bert"), files["validation"])
    msg = str(exc.value)
    assert (
        str(tmp_path / "validation.jsonl") in msg
        and "row 3" in msg
        and "column 'sentiment'" in msg
        and repr(bad) in msg
    )


def test_text_pairs(tmp_path, host):
    rows = [
        {"premise": "the movie was good", "hypothesis": "it was fun", "label": "yes"},
        {"premise": "the plot", "hypothesis": "was a mess", "label": "no"},
    ]
    task, splits, files = classification(tmp_path, host, rows, rows, text="premise", text_pair="hypothesis")
    tok = tiny_tokenizer("bert")
    enc = task.encode(splits["validation"], tok, files["validation"])
    first = enc[0]
    assert tok.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]",
        "the",
        "movie",
        "was",
        "good",
        "[SEP]",
        "it",
        "was",
        "fun",
        "[SEP]",
    ]
    batch = task.collate(tok)([enc[0], enc[1]])
    if "token_type_ids" in first:
        assert first["token_type_ids"] == [0] * 6 + [1] * 4
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert tok.convert_ids_to_tokens(enc[1]["input_ids"]) == [
        "[CLS]",
        "the",
        "plot",
        "[SEP]",
        "was",
        "a",
        "mess",
        "[SEP]",
    ]
    assert batch["attention_mask"][1].tolist() == [1] * 8 + [0] * 2
    assert batch["input_ids"][1, 8:].tolist() == [tok.pad_token_id] * 2
    assert batch["labels"].tolist() == [task.ids["yes"], task.ids["no"]]


def test_missing_text_pair_column(tmp_path, host):
    with pytest.raises(DataError, match=r"train\.jsonl: no column 'hypothesis'"):
        classification(tmp_path, host, ROWS, ROWS, text_pair="hypothesis")


# -- causal-LM fine-tuning: loss on responses only, padding masked by position -----------------


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def encode(rows, tok, file="sft.jsonl", **spec):
    task = CausalLM(DataSpec(source=file, **spec))
    return task, task.encode(dataset(rows), tok, file)


def supervised(row) -> list[int]:
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    for i, label in zip(ids, labels):
        assert label in (IGNORE, i)  # labels are the input ids (the model shifts), or ignored
    return [i for i, label in zip(ids, labels) if label != IGNORE]


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


PAIRS = [
    {"prompt": "what is one plus one", "response": "two"},
    {"prompt": "i love this movie", "response": "so we very love"},
]


def test_prompt_response_without_chat_template():
    tok = tiny_tokenizer("llama")
    assert not tok.chat_template
    _, enc = encode(PAIRS, tok)
    for row, pair in zip(enc, PAIRS):
        n_prompt = len(words(tok, pair["prompt"]))
        assert row["labels"][:n_prompt] == [IGNORE] * n_prompt  # exactly the prompt is masked
        assert IGNORE not in row["labels"][n_prompt:]
        assert supervised(row) == words(tok, pair["response"]) + [tok.eos_token_id]
        assert tok.decode(supervised(row)) == pair["response"] + " </s>"


def test_prompt_response_with_chat_template():
    tok = tiny_tokenizer("llama", chat=True)
    _, enc = encode(PAIRS, tok)
    row = enc[0]
    assert tok.convert_ids_to_tokens(row["input_ids"]) == [
        "<user>",
        "what",
        "is",
        "one",
        "plus",
        "one",
        "<assistant>",
        "two",
        "</s>",
    ]
    assert row["labels"] == [IGNORE] * 7 + words(tok, "two") + [tok.eos_token_id]
    assert tok.decode(supervised(enc[1])) == "so we very love </s>"


CONVERSATION = [
    {"role": "system", "content": "you are fun"},
    {"role": "user", "content": "is the movie good"},
    {"role": "assistant", "content": "yes it is great"},
    {"role": "user", "content": "and the acting"},
    {"role": "assistant", "content": "quite bad"},
    {"role": "user", "content": "why"},
    {"role": "assistant", "content": "boring and dull"},
]


@pytest.mark.parametrize("turns", [3, 5, 7], ids=["one-assistant-turn", "two-turns", "three-turns"])
def test_every_assistant_turn_is_trained_and_nothing_else(turns):
    tok = tiny_tokenizer("llama", chat=True)
    messages = CONVERSATION[:turns]
    _, enc = encode([{"messages": messages}], tok, messages="messages")
    row = enc[0]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [i for a in answers for i in words(tok, a) + [tok.eos_token_id]]
    assert supervised(row) == expected
    assert tok.decode(supervised(row)) == " ".join(a + " </s>" for a in answers)
    assert supervised(row).count(tok.eos_token_id) == len(answers)
    role_ids = set(tok.convert_tokens_to_ids(["<user>", "<assistant>", "<system>"]))
    for i, label in zip(row["input_ids"], row["labels"]):
        if i in role_ids:
            assert label == IGNORE
    # the user and system words are in the input, never in the labels
    user_words = [i for m in messages if m["role"] != "assistant" for i in words(tok, m["content"])]
    assert set(user_words) <= set(row["input_ids"])
    for j, label in enumerate(row["labels"]):
        if label != IGNORE:
            assert tok.convert_ids_to_tokens(row["input_ids"][: j + 1]).count("<assistant>") >= 1


def test_conversation_without_assistant_turn_is_an_error():
    tok = tiny_tokenizer("llama", chat=True)
    rows = [{"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[:2]}]
    with pytest.raises(DataError, match=r"sft\.jsonl: row 2 has no token to learn"):
        encode(rows, tok, messages="messages")


def test_messages_need_a_chat_template():
    with pytest.raises(DataError, match="chat template"):
        encode([{"messages": CONVERSATION[:3]}], tiny_tokenizer("llama"), messages="messages")


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_longer_than_max_length_names_the_row(chat):
    tok = tiny_tokenizer("llama", chat=chat)
    long_prompt = " ".join(["good"] * 12)
    rows = [PAIRS[0], PAIRS[1], {"prompt": long_prompt, "response": "fine"}]
    with pytest.raises(DataError) as exc:
        encode(rows, tok, max_length=10)
    assert "sft.jsonl: row 3" in str(exc.value) and "max_length=10" in str(exc.value)


def test_long_response_is_truncated_but_kept():
    tok = tiny_tokenizer("llama")
    _, enc = encode([{"prompt": "one two", "response": " ".join(["fun"] * 20)}], tok, max_length=8)
    assert (
        len(enc[0]["input_ids"]) == 8
        and enc[0]["labels"][:2] == [IGNORE, IGNORE]
        and len(supervised(enc[0])) == 6
    )


def test_collator_masks_padding_by_position_when_pad_is_eos():
    tok = tiny_tokenizer("llama", chat=True)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    task, enc = encode(PAIRS, tok)
    short, long = enc[0], enc[1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = task.collate(tok)([short, long])
    n, width = len(short["input_ids"]), len(long["input_ids"])
    eos = tok.eos_token_id
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["labels"][0, n - 1].item() == eos  # the real EOS is still learned
    assert batch["labels"][0, n:].tolist() == [IGNORE] * (width - n)  # the padding (also eos ids) is not
    assert batch["input_ids"][0, n:].tolist() == [eos] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1].tolist() == long["labels"] and batch["labels"][1, -1].item() == eos
    assert batch["attention_mask"][1].tolist() == [1] * width


def test_collator_without_pad_token_uses_eos_for_padding():
    tok = tiny_tokenizer("llama")
    _, enc = encode(PAIRS, tok)
    tok.pad_token = None
    task = CausalLM(DataSpec(source="x"))
    batch = task.collate(tok)([enc[0], enc[1]])
    n = len(enc[0]["input_ids"])
    assert batch["input_ids"][0, n:].eq(tok.eos_token_id).all()
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id and batch["labels"][0, n:].eq(IGNORE).all()


def test_language_modeling_learns_every_token():
    tok = tiny_tokenizer("llama")
    task = LanguageModeling(DataSpec(source="lm.jsonl"))
    enc = task.encode(dataset([{"text": "the movie was good"}, {"text": "bad"}]), tok, "lm.jsonl")
    assert enc[0]["labels"] == enc[0]["input_ids"] == words(tok, "the movie was good") + [tok.eos_token_id]
    with pytest.raises(DataError, match=r"lm\.jsonl: no column 'text'"):
        task.setup({"train": dataset([{"body": "x"}])}, {"train": "lm.jsonl"})


def test_causal_lm_missing_columns(tmp_path, host):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "a", "response": "b"}] * 4)
    spec = DataSpec(source=str(path))
    splits, files = load_data(spec, host, 0)
    with pytest.raises(DataError) as exc:
        CausalLM(spec).setup(splits, files)
    assert str(path) in str(exc.value) and "'prompt'" in str(exc.value)
