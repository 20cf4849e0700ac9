"""Merged vocabulary: layout, one tokenizer.json loadable by tokenizers/transformers, injection safety,
document round trips (incl. hypothesis), ids past 65 535, file mismatch errors, the build command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfusion.core.checkpoint import CheckpointError, write_manifest
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab_layout import CHAT_TOKENS, LAYOUT_FILE, SPECIAL_TOKENS, TOKENIZER_FILE, VocabLayout
from earlyfusion.tokenizer.vocab import Vocabulary

CORPUS = [
    "a red circle at the top left.", "a large blue square in the centre.", "there is a small green triangle on the right.",
    "héllo wörld, ça va? 日本語のテキスト", "emoji 🎉🚀 and more", "numbers 12345 and 67890",
] * 20
FP = "f" * 64


def make_vocab(codebook_size: int = 32, grid=(4, 4), text_vocab_size: int = 300) -> Vocabulary:
    return Vocabulary.build(CORPUS, codebook_size=codebook_size, grid=grid, image_tokenizer_fingerprint=FP,
                            text_vocab_size=text_vocab_size)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return make_vocab()


@pytest.fixture(scope="module")
def saved(vocab, tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab") / "v"
    vocab.save(d)
    return d


def canonical(segments) -> list:
    """What decode_document gives back: empty text dropped, adjacent text joined, grids as int64 tensors."""
    out: list = []
    for s in segments:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
            else:
                out.append(s)
        else:
            out.append(torch.as_tensor(np.asarray(s)).long())
    return out


def assert_same_segments(got, want):
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        if isinstance(w, str):
            assert g == w
        else:
            assert isinstance(g, torch.Tensor) and g.dtype == torch.long and torch.equal(g, w)


# ---------------------------------------------------------------- layout


def test_layout_ranges_are_contiguous_and_derived(vocab):
    L = vocab.layout
    assert sorted(L.special_ids.values()) == list(range(len(SPECIAL_TOKENS)))
    assert L.text_start == len(SPECIAL_TOKENS)
    assert 256 <= L.text_vocab_size <= 300
    assert vocab.image_start == L.text_end == L.text_start + L.text_vocab_size
    assert vocab.vocab_size == vocab.image_start + vocab.codebook_size == vocab.tokenizer.get_vocab_size()
    assert vocab.grid == (4, 4) and vocab.tokens_per_image == 16
    assert {vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi} == set(L.special_ids.values())
    assert VocabLayout.from_dict(json.loads(json.dumps(L.to_dict()))) == L


def test_layout_rejects_overlapping_ranges(vocab):
    d = vocab.layout.to_dict()
    d["image_start"] -= 1
    with pytest.raises(CheckpointError, match="image range"):
        VocabLayout.from_dict(d, "x/layout.json")


# ---------------------------------------------------------------- files and other loaders


def test_save_load_roundtrip(vocab, saved):
    assert {p.name for p in saved.iterdir()} >= {TOKENIZER_FILE, LAYOUT_FILE}
    v2 = Vocabulary.load(saved)
    assert v2.layout == vocab.layout
    text = "a red circle, héllo 🎉"
    assert v2.encode_text(text) == vocab.encode_text(text)


def test_tokenizers_library_loads_the_same_ids(vocab, saved):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(saved / TOKENIZER_FILE))
    assert tok.get_vocab_size() == vocab.vocab_size
    for role, text in SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == getattr(vocab, role)
    for code in (0, 7, vocab.codebook_size - 1):
        assert tok.token_to_id(vocab.layout.image_token(code)) == vocab.codes_to_ids(code)
    assert tok.encode("a red circle", add_special_tokens=False).ids == vocab.encode_text("a red circle")


def test_transformers_loads_the_tokenizer(vocab, saved):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(saved / TOKENIZER_FILE))
    assert len(hf) == vocab.vocab_size
    assert hf.convert_tokens_to_ids("<boi>") == vocab.boi
    assert hf.convert_tokens_to_ids(vocab.layout.image_token(5)) == vocab.image_start + 5
    text = "a large blue square, 日本語"
    assert hf.encode(text, add_special_tokens=False) == vocab.encode_text(text)
    assert hf.decode(vocab.encode_text(text)) == text
    auto = AutoTokenizer.from_pretrained(str(saved))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (vocab.bos, vocab.eos, vocab.pad)


def _copy(saved, tmp_path):
    d = tmp_path / "v"
    shutil.copytree(saved, d)
    return d


@pytest.mark.parametrize("edit", ["special", "image_start", "codebook", "grid_ok_but_text_size"])
def test_mismatched_layout_is_refused_naming_both_files(saved, tmp_path, edit):
    d = _copy(saved, tmp_path)
    layout = json.loads((d / LAYOUT_FILE).read_text())
    if edit == "special":
        layout["special_ids"]["boi"], layout["special_ids"]["eoi"] = layout["special_ids"]["eoi"], layout["special_ids"]["boi"]
    elif edit == "image_start":
        layout["image_start"] += 1
        layout["text_vocab_size"] += 1
        layout.pop("vocab_size")
    elif edit == "codebook":
        layout["codebook_size"] += 8
        layout.pop("vocab_size")
    else:
        layout["text_vocab_size"] -= 1
        layout["image_start"] -= 1
        layout.pop("vocab_size")
    (d / LAYOUT_FILE).write_text(json.dumps(layout))
    write_manifest(d)  # test the cross-checks themselves, not the checksums
    with pytest.raises(CheckpointError) as e:
        Vocabulary.load(d)
    assert TOKENIZER_FILE in str(e.value) and LAYOUT_FILE in str(e.value)


def test_tokenizer_from_another_vocabulary_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    make_vocab(codebook_size=64).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / TOKENIZER_FILE, d / TOKENIZER_FILE)
    write_manifest(d)  # test the cross-checks themselves, not the checksums
    with pytest.raises(CheckpointError, match="disagree"):
        Vocabulary.load(d)


def test_corrupted_files_are_detected(saved, tmp_path):
    d = tmp_path / "v"
    shutil.copytree(saved, d)
    raw = (d / TOKENIZER_FILE).read_bytes()
    (d / TOKENIZER_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=TOKENIZER_FILE):
        Vocabulary.load(d)  # checksum in MANIFEST.json
    write_manifest(d)
    with pytest.raises(CheckpointError, match=TOKENIZER_FILE):
        Vocabulary.load(d)  # unparsable JSON
    with pytest.raises(CheckpointError, match="not found"):
        Vocabulary.load(tmp_path / "nowhere")


# ---------------------------------------------------------------- text and injection


LOOKALIKES = [*SPECIAL_TOKENS.values(), "<img_00001>", "<img_00031>", "<img_1>", "<s></s><pad>", "x<boi>y<eoi>z"]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_special_token_text_is_encoded_as_plain_text(vocab, saved, text):
    ids = vocab.encode_text(text)
    assert all(i in vocab.text_range for i in ids), ids
    assert vocab.decode_text(ids) == text
    assert Vocabulary.load(saved).encode_text(text) == ids
    doc = vocab.encode_document([text])
    assert doc.count(vocab.bos) == 1 and doc.count(vocab.eos) == 1
    assert vocab.boi not in doc and not any(vocab.is_image_id(doc))


def test_the_raw_tokenizer_would_inject(vocab):
    """Why encode_text exists: the full tokenizer matches added tokens inside user text."""
    assert vocab.boi in vocab.tokenizer.encode("a<boi>b", add_special_tokens=False).ids
    assert vocab.boi not in vocab.encode_text("a<boi>b")


def test_text_roundtrip_and_errors(vocab):
    for text in ["", " ", "  leading and trailing  ", "\n\t\r\x00", "héllo 🎉 日本語", "a" * 1000]:
        assert vocab.decode_text(vocab.encode_text(text)) == text
    with pytest.raises(ValueError, match="non-text"):
        vocab.decode_text([vocab.boi])
    with pytest.raises(ValueError, match="non-text"):
        vocab.decode_text([vocab.image_start])
    with pytest.raises(ValueError, match="surrogate"):
        vocab.encode_text("bad \ud800 text")
    with pytest.raises(TypeError):
        vocab.encode_text(b"bytes")


# ---------------------------------------------------------------- codes and ids


def test_code_id_conversions_keep_types_and_check_ranges(vocab):
    codes = torch.tensor([[0, 31], [5, 6]])
    ids = vocab.codes_to_ids(codes)
    assert ids.dtype == torch.long and torch.equal(vocab.ids_to_codes(ids), codes)
    assert vocab.is_image_id(ids).all() and not vocab.is_image_id(torch.tensor([vocab.boi, vocab.text_start])).any()
    a = vocab.codes_to_ids(np.array([1, 2], dtype=np.uint8))
    assert a.dtype == np.int64 and vocab.ids_to_codes(a).tolist() == [1, 2]
    assert vocab.codes_to_ids([3, 4]) == [vocab.image_start + 3, vocab.image_start + 4]
    assert vocab.ids_to_codes(vocab.image_start + 9) == 9
    for bad in (torch.tensor([32]), torch.tensor([-1]), np.array([32]), 32, [0, 40]):
        with pytest.raises(ValueError):
            vocab.codes_to_ids(bad)
    with pytest.raises(ValueError):
        vocab.codes_to_ids(torch.tensor([0.5]))
    with pytest.raises(ValueError):
        vocab.ids_to_codes([vocab.boi])


def test_ids_past_65535_roundtrip():
    v = make_vocab(codebook_size=70000, grid=(2, 3))
    assert v.vocab_size > 65535
    codes = torch.tensor([[0, 1, 69999], [65535 - v.image_start + 1, 40000, 69998]])
    ids = v.codes_to_ids(codes)
    assert ids.dtype == torch.long and int(ids.max()) > 65535
    assert torch.equal(v.ids_to_codes(ids), codes)
    assert v.ids_to_codes(v.codes_to_ids(codes.numpy())).tolist() == codes.tolist()
    doc = v.encode_document(["top", codes, "end"])
    assert all(type(i) is int for i in doc) and max(doc) > 65535
    assert_same_segments(v.decode_document(doc), ["top", codes, "end"])
    assert v.tokenizer.token_to_id(v.layout.image_token(69999)) == v.vocab_size - 1


# ---------------------------------------------------------------- documents


def _grid(seed: int, n: int = 32) -> torch.Tensor:
    return torch.randint(0, n, (4, 4), generator=torch.Generator().manual_seed(seed))


DOCS = {
    "unicode": ["héllo wörld 日本語 ça"],
    "emoji": ["🎉🚀👩‍👩‍👧", _grid(0), "✓"],
    "empty_text": ["", _grid(1), ""],
    "image_first": [_grid(2), "after the image"],
    "image_last": ["before the image", _grid(3)],
    "consecutive_images": [_grid(4), _grid(5), _grid(6)],
    "text_only": ["just text, no images."],
    "empty": [],
    "adjacent_text": ["two ", "segments"],
    "lookalikes": ["<boi>", _grid(7), "</s><img_00003>"],
}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_document_roundtrip(vocab, name):
    doc = DOCS[name]
    ids = vocab.encode_document(doc)
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos
    assert ids.count(vocab.boi) == ids.count(vocab.eoi) == sum(not isinstance(s, str) for s in doc)
    assert_same_segments(vocab.decode_document(ids), canonical(doc))
    assert vocab.encode_document(doc, bos=False, eos=False) == ids[1:-1]


def test_document_accepts_numpy_and_lists_and_rejects_wrong_grids(vocab):
    g = _grid(8)
    a = vocab.encode_document(["x", g])
    assert vocab.encode_document(["x", g.numpy().astype(np.int32)]) == a == vocab.encode_document(["x", g.tolist()])
    with pytest.raises(ValueError, match="shape"):
        vocab.encode_document([torch.zeros(2, 8, dtype=torch.long)])
    with pytest.raises(ValueError, match="shape"):
        vocab.encode_document([g.reshape(-1)])
    with pytest.raises(ValueError):
        vocab.encode_document([g.float()])


def test_decode_malformed_spans(vocab):
    codes = vocab.codes_to_ids(list(range(16)))
    B, E, bo, eo = vocab.bos, vocab.eos, vocab.boi, vocab.eoi
    text = vocab.encode_text("ok")
    cases = {
        "truncated_by_eos": [B, *text, bo, *codes[:3], E],
        "truncated_by_end": [B, *text, bo, *codes[:15]],
        "text_inside_span": [B, *text, bo, *codes[:5], *text],
        "no_eoi": [B, *text, bo, *codes, *codes[:1], eo],
        "stray_eoi": [B, *text, eo],
        "stray_code": [B, *text, codes[0]],
    }
    for name, ids in cases.items():
        with pytest.raises(ValueError, match="malformed"):
            vocab.decode_document(ids)
        got = vocab.decode_document(ids, strict=False)
        assert isinstance(got[0], str) and got[0].startswith("ok"), (name, got)
        assert not any(isinstance(s, torch.Tensor) for s in got), (name, got)
    # the id that broke a span is read normally
    assert vocab.decode_document(cases["text_inside_span"], strict=False) == ["okok"]
    # everything after the first </s> is ignored; pads and bos are dropped anywhere
    assert vocab.decode_document([B, vocab.pad, *text, B, E, *text]) == ["ok"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.decode_document([vocab.vocab_size], strict=False)


# ---------------------------------------------------------------- property test


_texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(LOOKALIKES + ["a", " ", "é", "🎉", "\n", "<", ">", "img_", "0"]), max_size=8).map("".join),
)
_grids = st.lists(st.integers(0, 31), min_size=16, max_size=16).map(lambda xs: torch.tensor(xs).reshape(4, 4))
_docs = st.lists(st.one_of(_texts, _grids), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_docs)
def test_property_interleaved_documents_roundtrip_exactly(vocab, doc):
    ids = vocab.encode_document(doc)
    assert all(type(i) is int and 0 <= i < vocab.vocab_size for i in ids)
    n_images = sum(not isinstance(s, str) for s in doc)
    assert ids.count(vocab.boi) == n_images and ids.count(vocab.eoi) == n_images
    assert sum(vocab.is_image_id(ids)) == 16 * n_images
    assert_same_segments(vocab.decode_document(ids), canonical(doc))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_property_text_never_emits_reserved_ids(vocab, text):
    ids = vocab.encode_text(text)
    assert all(vocab.text_start <= i < vocab.image_start for i in ids)
    assert vocab.decode_text(ids) == text


# ---------------------------------------------------------------- the build command


def test_build_command_reads_every_part_of_the_data(tmp_path, capsys):
    from earlyfusion.cli import main
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE
    from earlyfusion.tokenizer.vq_checkpoint import save_vqvae, vq_fingerprint

    vq = tmp_path / "vq"
    save_vqvae(VQVAE(VQ_PRESETS["tiny"]), vq)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": "captionword " * 3}) for i in range(30)) + "\n")
    (data / "interleaved.jsonl").write_text(
        "\n".join(json.dumps({"texts": ["interleavedword " * 3, None], "images": [None, "train/0.png"]}) for _ in range(30)) + "\n")
    (data / "text.jsonl").write_text("\n".join(json.dumps({"text": "textlineword " * 3}) for _ in range(30)) + "\nnot json\n")
    out = tmp_path / "vocab"
    assert main(["vocab", "build", "--image-tokenizer", str(vq), "--data", str(data), "--out", str(out),
                 "--text-vocab-size", "400"]) == 0
    printed = capsys.readouterr().out
    assert "32 image codes" in printed and "4x4" in printed and "1 bad_json" in printed
    v = Vocabulary.load(out)
    assert v.codebook_size == 32 and v.grid == (4, 4) and v.text_vocab_size <= 400
    assert v.layout.image_tokenizer_fingerprint == vq_fingerprint(vq)
    for word in ("captionword", "interleavedword", "textlineword"):  # frequent words of each part became one token
        assert len(v.encode_text(" " + word)) == 1, word
    # a non-vocabulary directory is never overwritten; a missing image tokenizer is a clear error
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["vocab", "build", "--image-tokenizer", str(vq), "--data", str(data), "--out", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert main(["vocab", "build", "--image-tokenizer", str(tmp_path / "novq"), "--data", str(data), "--out", str(out)]) == 2
    assert main(["vocab", "build", "--image-tokenizer", str(vq), "--data", str(data), "--out", str(out),
                 "--text-vocab-size", "100"]) == 2


def test_a_chat_vocabulary_has_the_conversation_markers_after_the_special_tokens(vocab, tmp_path):
    """The markers follow the five special tokens, survive save and load (its manifest checked), and no text spells
    them; a vocabulary without them says so in one line when asked for one."""
    chat = Vocabulary.build(CORPUS, codebook_size=32, grid=(4, 4), image_tokenizer_fingerprint=FP,
                            text_vocab_size=300, chat=True)
    L = chat.layout
    assert chat.chat and not vocab.chat
    assert [L.special_ids[r] for r in (*SPECIAL_TOKENS, *CHAT_TOKENS)] == list(range(8)) and L.text_start == 8
    chat.save(tmp_path / "chat")
    again = Vocabulary.load(tmp_path / "chat")
    assert again.layout == L and again.chat_id("eot") == L.special_ids["eot"]
    for text in CHAT_TOKENS.values():
        assert not set(again.encode_text(f"a {text} b")) & set(L.special_ids.values())
    with pytest.raises(UserError, match="no conversation markers"):
        vocab.chat_id("user")
