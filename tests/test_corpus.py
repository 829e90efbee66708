"""Corpus input: formats, what is skipped and reported, and what is an error."""

import json

import pytest

from ctxdistill.inputs.corpus import load_corpus
from ctxdistill.errors import CtxDistillError

TEXT = "The river port of Velmora opened a new bridge. It is 412 metres long."


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_with_custom_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"key": "a", "body": TEXT}, {"key": "b", "body": TEXT + " More."}])
    docs, report = load_corpus(str(path), text_field="body", id_field="key")
    assert [d.id for d in docs] == ["a", "b"] and report.kept == 2


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text(TEXT)
    (tmp_path / "docs" / "two.txt").write_text(TEXT + " Again.")
    docs, _ = load_corpus(str(tmp_path / "docs"))
    assert [d.id for d in docs] == ["one", "two"]
    docs, _ = load_corpus(str(tmp_path / "docs" / "one.txt"))
    assert docs[0].text == TEXT


def test_csv_through_datasets(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(f'id,text\nx,"{TEXT}"\n', encoding="utf-8")
    docs, _ = load_corpus(str(path))
    assert docs[0].id == "x" and docs[0].text == TEXT


def test_bundled_corpus():
    docs, report = load_corpus("bundled:news_updates")
    assert len(docs) >= 40 and report.skipped == {}


def test_empty_duplicate_short_and_non_utf8_documents_are_skipped_and_reported(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": TEXT}), json.dumps({"text": "  "}), json.dumps({"text": TEXT}), json.dumps({"text": "Too short."})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9 au lait is good. Really good."}\n')
    docs, report = load_corpus(str(path))
    assert len(docs) == 1
    summary = report.to_dict()["skipped"]
    assert summary == {"empty": 1, "duplicate": 1, "too-short (<20 chars)": 1, "non-UTF-8": 1}
    assert "c.jsonl:3" in " ".join(report.summary())


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', r"c.jsonl:2: not valid JSON"),
    ('{"body": "no text field here at all"}\n', r"no field 'text'.*text_field"),
    ("\n\n", "no usable documents"),
    ('{"text": 5}\n', "must be a string"),
])
def test_structural_problems_are_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(CtxDistillError, match=message):
        load_corpus(str(path))


def test_missing_corpus_and_unknown_bundle(tmp_path):
    with pytest.raises(CtxDistillError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    with pytest.raises(CtxDistillError, match="no bundled data named 'nope'"):
        load_corpus("bundled:nope")


def test_non_regular_files_are_refused(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for spec in (str(fifo), "/dev/zero"):
        with pytest.raises(CtxDistillError, match="is not a regular file or a directory"):
            load_corpus(spec)


def test_a_line_or_document_beyond_the_cap_is_refused(tmp_path, monkeypatch):
    import ctxdistill.inputs.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", 100)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": TEXT}, {"text": TEXT * 3}])
    with pytest.raises(CtxDistillError, match=r"c.jsonl:2: longer than"):
        load_corpus(str(path))
    (tmp_path / "long.txt").write_text(TEXT * 3)
    with pytest.raises(CtxDistillError, match="long.txt: longer than"):
        load_corpus(str(tmp_path / "long.txt"))


def test_deep_nesting_and_lone_surrogates(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 200_000 + "\n")
    with pytest.raises(CtxDistillError, match="deep.jsonl:1: JSON nested too deeply"):
        load_corpus(str(deep))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": TEXT}) + "\n" + '{"text": "x \\ud800 ' + TEXT + '"}\n' + '{"id": "\\udfff", "text": "' + TEXT + ' Two."}\n')
    docs, report = load_corpus(str(mixed))
    assert [d.text for d in docs] == [TEXT] and report.to_dict()["skipped"] == {"non-UTF-8": 2}
