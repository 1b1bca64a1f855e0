"""Reading data files, bad-row reporting, stats and preview (loratune.data.build/sources/preview)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.data import IGNORE_INDEX, DataConfig, build_datasets, check_vocab, preview
from loratune.errors import ConfigError, DataError
from loratune.tools.loading import DEFAULT_MODEL, load_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
GOOD = {"prompt": "What is 2 + 3?\n", "completion": "5"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build(tok, path, **kw):
    return build_datasets(DataConfig(train_file=str(path), **kw), tok)


def test_example_datasets_build(tok):
    cfg = DataConfig(train_file=str(EXAMPLES / "train.jsonl"), eval_file=str(EXAMPLES / "eval.jsonl"))
    bundle = build_datasets(cfg, tok)
    assert (bundle.stats.format, bundle.stats.examples, bundle.stats.skipped) == ("messages", 480, 0)
    assert len(bundle.eval) == bundle.eval_stats.examples == 48
    assert 0.1 < bundle.stats.trained_share < 0.6
    assert bundle.stats.length_quantiles()["max"] < 128  # short rows: the demo trains fast
    alpaca = build(tok, EXAMPLES / "alpaca.jsonl")
    assert alpaca.stats.format == "alpaca" and alpaca.eval is None and len(alpaca.train) == 64
    for ex in bundle.train[:20] + alpaca.train[:20]:
        assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][-1] != IGNORE_INDEX
    assert sum((EXAMPLES / n).stat().st_size for n in ("train.jsonl", "eval.jsonl", "alpaca.jsonl")) < 300_000


def test_invalid_json_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, "", '{"prompt": "x", "completion": }', GOOD])
    with pytest.raises(DataError,
                       match=r"^train.jsonl line 4: invalid JSON \(Expecting value at column 31\)"):
        build(tok, path)


def test_several_bad_rows_are_listed_together(tok, tmp_path):
    rows = [GOOD, {"prompt": "x"}, {"prompt": "x", "completion": 3}, {"prompt": "x", "completion": ""},
            "[1, 2]", GOOD]
    with pytest.raises(DataError) as err:
        build(tok, write_jsonl(tmp_path / "train.jsonl", rows))
    assert str(err.value).splitlines() == [
        "train.jsonl: 4 bad rows (fix them, or skip them with skip_bad_rows: true or --skip_bad_rows):",
        "  - train.jsonl line 5: expected a JSON object, got list",
        "  - train.jsonl line 2: missing field 'completion'",
        "  - train.jsonl line 3: field 'completion' must be a string, got int",
        "  - train.jsonl line 4: field 'completion' is empty",
    ]


def test_many_bad_rows_are_capped(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] + [{"prompt": "x"}] * 25)
    with pytest.raises(DataError, match=r"25 bad rows") as err:
        build(tok, path)
    assert str(err.value).count("  - ") == 10 and str(err.value).endswith("... and 15 more")


def test_skip_bad_rows_counts_them(tok, tmp_path, caplog):
    rows = [GOOD, {"prompt": "x"}, "not json", GOOD, {"prompt": "x", "completion": 3}]
    bundle = build(tok, write_jsonl(tmp_path / "train.jsonl", rows), skip_bad_rows=True)
    assert (bundle.stats.rows, bundle.stats.examples, bundle.stats.skipped) == (5, 2, 3)
    assert "skipped 3 bad row(s) of 5" in caplog.text
    with pytest.raises(DataError, match="the only row is bad"):
        build(tok, write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": 3}]),
              skip_bad_rows=True)


def test_bad_messages_rows_name_the_line(tok, tmp_path):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [ok, {"messages": []}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError) as err:
        build(tok, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert "chat.jsonl line 2: field 'messages' is an empty list" in str(err.value)
    assert "chat.jsonl line 3: messages has no assistant turn" in str(err.value)


def test_unknown_message_role_names_the_line_and_the_allowed_roles(tok, tmp_path):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    wizard = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError) as err:
        build(tok, write_jsonl(tmp_path / "chat.jsonl", [ok, wizard]))
    assert ("chat.jsonl line 2: messages[0].role is 'wizard'; expected one of system, user, assistant"
            in str(err.value))


def test_truncation_is_counted_and_untrainable_rows_dropped(tok, tmp_path):
    rows = [GOOD, {"prompt": "x " * 50, "completion": "y"},
            {"prompt": "Q", "completion": "a b c d e f g h i j k l"}]
    bundle = build(tok, write_jsonl(tmp_path / "train.jsonl", rows), max_seq_length=10)
    s = bundle.stats
    assert (s.examples, s.truncated, s.dropped_untrained) == (2, 2, 1)
    assert max(len(ex["input_ids"]) for ex in bundle.train) == 10
    assert s.tokens == sum(s.lengths) == sum(len(ex["input_ids"]) for ex in bundle.train)


def test_csv_json_and_parquet_sources(tok, tmp_path):
    (tmp_path / "t.csv").write_text('prompt,completion\n"Q1\nstill Q1",A1\nQ2,\nQ3,A3\n')
    with pytest.raises(DataError, match=r"^t.csv line 4: field 'completion' is empty"):
        build(tok, tmp_path / "t.csv")
    assert len(build(tok, tmp_path / "t.csv", skip_bad_rows=True).train) == 2
    (tmp_path / "t.json").write_text(json.dumps([GOOD, {"prompt": "Q"}]))
    with pytest.raises(DataError, match=r"^t.json item 2: missing field 'completion'"):
        build(tok, tmp_path / "t.json")
    (tmp_path / "cols.json").write_text(json.dumps({"text": ["a b", "c d"]}))
    assert build(tok, tmp_path / "cols.json").stats.format == "text"
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert len(build(tok, tmp_path / "lines.json").train) == 2
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"input_ids": [[1, 5, 6, 7], [1, 8]], "labels": [[-100, -100, 6, 7], [-100, 8]]}).to_parquet(
        tmp_path / "t.parquet")
    bundle = build(tok, tmp_path / "t.parquet")
    assert bundle.stats.format == "tokenized"
    assert bundle.train == [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
                            {"input_ids": [1, 8], "labels": [-100, 8]}]


def test_pretokenized_ids_and_labels_are_checked(tok, tmp_path):
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
            {"input_ids": [1, 2, 3], "labels": [-100, -5, 3]},  # a negative label would index from the end
            {"input_ids": [1, 2, 9000], "labels": [-100, 2, 3]},  # past the model's vocabulary
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 9001]}]
    with pytest.raises(DataError,
                       match=r"t.jsonl line 2: field 'labels' has negative values other than -100"):
        build(tok, write_jsonl(tmp_path / "t.jsonl", rows))
    bundle = build(tok, write_jsonl(tmp_path / "t.jsonl", [rows[0], rows[2], rows[3]]))
    check_vocab(bundle, 9002)  # all inside
    with pytest.raises(DataError) as err:
        check_vocab(bundle, 9000)
    msg = str(err.value)
    assert "2 row(s)" in msg
    assert "t.jsonl line 2: token id 9000" in msg and "t.jsonl line 3: token id 9001" in msg
    assert "line 1" not in msg


def test_missing_and_unsupported_files_are_config_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="train_file 'nope.jsonl' does not exist"):
        build(tok, "nope.jsonl")
    (tmp_path / "t.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported file type '.txt'"):
        build(tok, tmp_path / "t.txt")
    with pytest.raises(ConfigError, match="no training data"):
        build_datasets(DataConfig(), tok)
    with pytest.raises(ConfigError, match=r"x\.jsonl: cannot tell the data format from the columns"):
        build(tok, write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(ConfigError, match="is a directory, not a data file"):
        build(tok, tmp_path)


def test_column_mapping(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2 + 3?\n", "answer": "5"}])
    mapped = build(tok, path, prompt_column="question", completion_column="answer")
    assert mapped.train == build(tok, write_jsonl(tmp_path / "pc.jsonl", [GOOD])).train


def test_eval_samples_holds_out_rows_deterministically(tok):
    cfg = DataConfig(train_file=str(EXAMPLES / "train.jsonl"), eval_samples=30)
    a, b, c = build_datasets(cfg, tok, 0), build_datasets(cfg, tok, 0), build_datasets(cfg, tok, 1)
    assert (len(a.train), len(a.eval)) == (450, 30)
    assert a.eval == b.eval and a.eval != c.eval
    assert a.eval_stats.source == "train.jsonl (held out)"


def test_data_config_collects_all_problems():
    with pytest.raises(ConfigError) as err:
        DataConfig(train_file="a.jsonl", dataset_name="x", max_seq_length=1, dataset_format="yaml",
                   eval_samples=-1)
    assert len(err.value.problems) == 4
    assert DataConfig.__dataclass_fields__["packing"].metadata["help"]
    assert all(f.metadata.get("help") for f in DataConfig.__dataclass_fields__.values())


def test_preview_marks_trained_tokens(tok, tmp_path):
    report = preview(DataConfig(train_file=str(EXAMPLES / "train.jsonl")), tok, n=2)
    assert len(report.examples) == 2 and report.examples[0].where == "train.jsonl line 1"
    text = report.to_text()
    assert "<|im_start|>assistant\n[[The opposite of full is empty.<|im_end|>\n]]" in text
    assert "truncated to 1024: 0" in text and f"({100 * report.stats.trained_share:.1f}%)" in text
    assert "\033[32m" in report.to_text(color=True) and "\033[" not in text
    short = preview(DataConfig(train_file=str(EXAMPLES / "train.jsonl"), max_seq_length=24), tok, n=1)
    assert short.stats.truncated > 0 and f"truncated to 24: {short.stats.truncated}" in short.to_text()


def test_dataset_name_reads_a_local_dataset_directory(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3)
    write_jsonl(tmp_path / "test.jsonl", [GOOD, {"prompt": "x"}])  # arrow fills the gap with None
    cfg = DataConfig(dataset_name=str(tmp_path), eval_split="test", skip_bad_rows=True)
    bundle = build_datasets(cfg, tok)
    assert (len(bundle.train), len(bundle.eval), bundle.eval_stats.skipped) == (3, 1, 1)
    with pytest.raises(DataError, match=r"\[test\] row 2: missing field 'completion'"):
        build_datasets(DataConfig(dataset_name=str(tmp_path), eval_split="test"), tok)
    with pytest.raises(ConfigError, match="Unknown split"):
        build_datasets(DataConfig(dataset_name=str(tmp_path), dataset_split="nope"), tok)


def test_byte_order_marks_and_bad_utf8(tok, tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\nQ,A\n")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(build(tok, tmp_path / "bom.csv").train) == len(build(tok, tmp_path / "bom.jsonl").train) == 1
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^latin1.jsonl line 2: not valid UTF-8"):
        build(tok, tmp_path / "latin1.jsonl")


def test_dataset_name_reads_a_folder_written_by_save_to_disk(tok, tmp_path):
    """load_dataset refuses such a folder ("use load_from_disk instead"); both kinds are read."""
    import datasets

    datasets.Dataset.from_list([GOOD] * 3).save_to_disk(str(tmp_path / "one"))
    assert len(build_datasets(DataConfig(dataset_name=str(tmp_path / "one")), tok).train) == 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] * 2),
                          "test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "two"))
    bundle = build_datasets(DataConfig(dataset_name=str(tmp_path / "two"), eval_split="test"), tok)
    assert (len(bundle.train), len(bundle.eval)) == (2, 1)
    with pytest.raises(ConfigError, match="no split 'nope'; its splits: train, test"):
        build_datasets(DataConfig(dataset_name=str(tmp_path / "two"), dataset_split="nope"), tok)


def test_conversations_of_role_and_content_turns_are_messages(tok, tmp_path):
    """The hub's other convention: `conversations` holding role/content turns, not from/value."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(tmp_path / "c.jsonl", [{"conversations": turns}] * 2)
    write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}] * 2)
    a, b = build(tok, tmp_path / "c.jsonl"), build(tok, tmp_path / "m.jsonl")
    assert a.stats.format == "messages" and a.train[0] == b.train[0]
