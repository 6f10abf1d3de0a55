"""Tokenizer export: SentencePiece (unigram and BPE, with and without byte fallback) and HF tokenizers both become a
working AutoTokenizer that gives exactly the ids of the original tokenizer."""

from pathlib import Path

import pytest

from mesh_tools.hf.tokenizer import TokenizerExportError, TokenizerSource, export_tokenizer

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "export_corpus.txt"
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tokenizers"  # shipped by data_tools


def corpus_lines(n=200):
    return [l for l in CORPUS.read_text().splitlines()[1:] if l.strip()][:n]


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("sp")
    out = {}
    for mt in ("unigram", "bpe"):
        for bf in (False, True):
            prefix = root / f"{mt}_{int(bf)}"
            spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(prefix), vocab_size=400, model_type=mt,
                                           byte_fallback=bf, minloglevel=2)
            out[(mt, bf)] = Path(f"{prefix}.model")
    return out


@pytest.mark.parametrize("mt", ["unigram", "bpe"])
@pytest.mark.parametrize("bf", [False, True])
def test_sentencepiece_becomes_equivalent_autotokenizer(sp_models, tmp_path, mt, bf):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = sp_models[(mt, bf)]
    ids = export_tokenizer(TokenizerSource("sentencepiece", model), tmp_path, model_max_length=128)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert ids["eos_token_id"] == sp.eos_id()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == sp.eos_id() and tok.model_max_length == 128
    texts = corpus_lines() + ["  leading and  double  spaces ", "unicode: naïve ﬁ ① 日本", "tabs\tand\nnewlines"]
    for text in texts:
        assert tok(text)["input_ids"] == sp.encode(text), text
    for text in corpus_lines(50):
        if sp.unk_id() not in sp.encode(text):  # (sentencepiece renders <unk> as ' ⁇ ')
            assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    if bf:  # byte fallback: unseen characters round-trip through byte pieces
        assert tok.decode(tok("漢字 🙂")["input_ids"]) == "漢字 🙂"


def test_hf_tokenizer_json_exports(tmp_path):
    """A real tokenizers BPE (trained here; the Pythia one is checked below when ../shared is present)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer_src.json"))
    out = tmp_path / "out"
    out.mkdir()
    ids = export_tokenizer(TokenizerSource("hf", tmp_path / "tokenizer_src.json"), out, model_max_length=64)
    assert ids == {"eos_token_id": 0, "bos_token_id": 0}
    tok = AutoTokenizer.from_pretrained(out)
    for text in corpus_lines(50):
        assert tok(text)["input_ids"] == t.encode(text).ids
        assert tok.decode(tok(text)["input_ids"]) == text


def test_pythia_tokenizer_exports(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    src = SHIPPED / "gpt-neox-20b.json"
    ids = export_tokenizer(TokenizerSource("hf", src), tmp_path, model_max_length=2048)
    assert ids == {"eos_token_id": 0, "bos_token_id": 0}  # <|endoftext|>, as Pythia
    tok, ref = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_file(str(src))
    for text in corpus_lines(50) + ["Hello world", "  spaces  "]:
        assert tok(text)["input_ids"] == ref.encode(text).ids


def test_shipped_sentencepiece_exports(tmp_path):
    """The tiny configs' tokenizer (BPE, byte fallback, identity normalization, vocab 8192)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = SHIPPED / "sample_sp8k.model"
    ids = export_tokenizer(TokenizerSource("sentencepiece", src), tmp_path, model_max_length=128)
    sp = spm.SentencePieceProcessor(model_file=str(src))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert ids["eos_token_id"] == sp.eos_id() and len(tok) == sp.vocab_size() == 8192
    for text in corpus_lines(100) + ["  leading and  double  spaces ", "unicode: naïve ﬁ ① 日本 🙂"]:
        assert tok(text)["input_ids"] == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerExportError, match="not a SentencePiece model"):
        export_tokenizer(TokenizerSource("sentencepiece", bad), tmp_path, 8)
    badj = tmp_path / "bad.json"
    badj.write_text("{}")
    with pytest.raises(TokenizerExportError, match="not a Hugging Face tokenizer.json"):
        export_tokenizer(TokenizerSource("hf", badj), tmp_path, 8)
    with pytest.raises(TokenizerExportError, match="not found"):
        export_tokenizer(TokenizerSource("hf", tmp_path / "missing.json"), tmp_path, 8)
