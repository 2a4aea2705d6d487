"""Training data: packing keeps documents apart, rows are deterministic and resumable, SFT trains exactly
the assistant tokens, bad lines are named."""

import json

import numpy as np
import pytest
import torch

import llamalab
from llamalab.errors import LlamalabError
from llamalab.train.chat_format import ChatFormat
from llamalab.train.config import DataConfig, SourceConfig
from llamalab.train.data import IGNORE, Mixture, RowSource, TokenizedSource, build_mixture, load_source


def source(lengths, mask=None):
    tokens = np.concatenate([np.arange(100 * (i + 1), 100 * (i + 1) + n) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedSource("test", tokens, np.ones(len(tokens), bool) if mask is None else mask, offsets)


def test_packed_rows_cover_the_epoch_and_never_cross_documents():
    src = source([5, 9, 3, 14, 7])
    rows = RowSource(src, seq_len=8, packing=True, seed=1)
    assert rows.rows_per_epoch == (38 - 1) // 8
    seen = []
    for k in range(rows.rows_per_epoch):
        r = rows.row(k)
        assert r.input_ids.shape == r.labels.shape == r.doc_ids.shape == (8,)
        for i in range(8):  # a label is the next token of the same document, else ignored
            if r.labels[i] != IGNORE:
                assert r.labels[i] == r.input_ids[i] + 1 and (i == 7 or r.doc_ids[i + 1] == r.doc_ids[i])
            elif i < 7:
                assert r.doc_ids[i + 1] != r.doc_ids[i]
        seen += r.input_ids.tolist()
    assert len(set(seen)) == len(seen)  # consecutive rows overlap by one label token only
    again = RowSource(src, seq_len=8, packing=True, seed=1)
    assert torch.equal(again.row(5).input_ids, rows.row(5).input_ids)  # row k is a function of (seed, k)
    assert not torch.equal(RowSource(src, 8, True, seed=2).row(0).input_ids, rows.row(0).input_ids)


def test_padded_rows_hold_one_document():
    r = RowSource(source([5, 20]), seq_len=8, packing=False, seed=0).row(0)
    n = int((r.doc_ids == 0).sum())
    assert n in (5, 8) and (r.labels[n - 1 :] == IGNORE).all()


def test_mixture_follows_the_weights_and_resumes_from_its_state():
    a, b = RowSource(source([50] * 4), 8, True, 0), RowSource(source([40] * 4), 8, True, 1)
    mix = Mixture([a, b], [3.0, 1.0], seed=0)
    rows = mix.next_rows(400)
    from_a = sum(int(r.input_ids[0]) < 100 * 5 and r.input_ids[0] % 100 < 50 for r in rows)
    assert 260 < mix.counts[0] < 340 and from_a > 0
    state = mix.state()
    later = mix.next_rows(5)
    fresh = Mixture([a, b], [3.0, 1.0], seed=0)
    fresh.load_state(state)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(fresh.next_rows(5), later))


def test_sft_trains_exactly_the_assistant_tokens(tiny_dir, tmp_path):
    llm = llamalab.load(str(tiny_dir))
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who is Alice?"},
            {"role": "assistant", "content": "A girl."}, {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Wonderland."}]  # fmt: skip
    ids, mask = ChatFormat(llm.tokenizer).conversation(conv, "x")
    assert ids == llm.encode(
        llm.apply_chat_template(conv, add_generation_prompt=False), add_special_tokens=False
    )
    trained = llm.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "A girl.<|im_end|>\nWonderland.<|im_end|>\n"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n")
    mix = build_mixture(DataConfig(train=[SourceConfig(str(path))], seq_len=200, packing=False), "sft",
                        llm.tokenizer, ChatFormat(llm.tokenizer), 0)  # fmt: skip
    row = mix.next_rows(1)[0]
    labels = row.labels[row.labels != IGNORE].tolist()
    assert llm.decode(labels, skip_special_tokens=False) == trained


def test_bad_lines_and_sources_are_named(tiny_dir, tmp_path):
    llm = llamalab.load(str(tiny_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(LlamalabError, match=r"bad.jsonl:2: not valid JSON"):
        load_source(SourceConfig(str(bad)), "chat", llm.tokenizer, ChatFormat(llm.tokenizer))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(LlamalabError, match=r"bad.jsonl:1: no assistant message to train on"):
        load_source(SourceConfig(str(bad)), "chat", llm.tokenizer, ChatFormat(llm.tokenizer))
    with pytest.raises(LlamalabError, match="no such file or folder"):
        load_source(SourceConfig(str(tmp_path / "nope.txt")), "text", llm.tokenizer, None)


def test_tokenization_is_cached(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    llm = llamalab.load(str(tiny_dir))
    text = tmp_path / "t.txt"
    text.write_text("Alice was beginning to get very tired. " * 20)
    first = load_source(SourceConfig(str(text)), "text", llm.tokenizer, None)
    assert len(list((tmp_path / "cache" / "llamalab" / "tokens").glob("*.npz"))) == 1
    monkeypatch.setattr(llm.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized twice"))
    assert np.array_equal(
        load_source(SourceConfig(str(text)), "text", llm.tokenizer, None).tokens, first.tokens
    )


def test_replay_takes_its_fraction_of_the_rows(tiny_dir, tmp_path):
    llm = llamalab.load(str(tiny_dir))
    new = tmp_path / "new.txt"
    new.write_text("The Queen of Hearts, she made some tarts, all on a summer day. " * 40)
    cfg = DataConfig(
        train=[SourceConfig(str(new))], replay=SourceConfig("alice"), replay_fraction=0.25, seq_len=32
    )
    mix = build_mixture(cfg, "clm", llm.tokenizer, None, 0)
    mix.next_rows(400)
    assert 80 < mix.counts[1] < 120  # about a quarter from the replayed source
