"""Chameleon's vocabulary (``tokenizer.json`` of a transformers checkpoint) rewritten into our ``VocabLayout``.

Chameleon's ids are not in our order: ``<s> <pad> </s> <unk>``, then the image codes as BPE tokens named
``IMGIMG…``, then ``<eoss>`` (end-image), ``<racm3:break>`` (begin-image), reserved tokens and text. Our
layout is fixed: ``[bos eos pad boi eoi | text BPE | image codes]`` with ``id = image_start + code``. So
the import builds a permutation ``ours_to_theirs`` (our id -> their id):

* their ``<s> </s> <pad> <racm3:break> <eoss>`` become our bos, eos, pad, boi, eoi (ids 0..4);
* every other non-image token (text BPE, ``<unk>``, reserved tokens, ``<image>``) goes to the text range
  in their original order;
* every ``IMGIMG`` token goes to ``image_start + code``, the code read from its NAME, the way transformers'
  ``ChameleonImageVocabularyMapping.bpe2img`` reads it: the characters between "IMGIMG" and the last one
  are the code's decimal digits spelled A=0 … J=9 (``IMGIMGBAZ`` is code 10). Never by position.

The rewritten ``tokenizer.json`` holds the same BPE model (vocab ids renumbered; merges that build an
image token dropped: our image tokens are added tokens ``<img_00042>``, never produced from text), the
same normalizer, pre-tokenizer and decoder, and every id elsewhere in the file (added tokens, post
processor, padding) renumbered, so ``Vocabulary`` encodes text exactly as their tokenizer does, up to the
permutation (text that spells one of their added tokens aside: ours never matches those in text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vocab_layout import (
    MIN_IMAGE_TOKEN_DIGITS,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    VocabLayout,
    image_token,
)

IMAGE_NAME_PREFIX = "IMGIMG"
# role -> Chameleon's token text (the roles and their order are ours: SPECIAL_TOKENS)
CHAMELEON_SPECIALS: dict[str, str] = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "boi": "<racm3:break>", "eoi": "<eoss>"}
assert list(CHAMELEON_SPECIALS) == list(SPECIAL_TOKENS)
# their end of a turn (Meta's tokenizer calls it eot; Anole's code stops at it): our "eot" role where the file has it,
# so that an imported run writes conversations with their template (``training.data.chat_template``)
CHAMELEON_EOT = "<reserved08706>"
_DIGIT_LETTERS = "ABCDEFGHIJ"
_IMAGE_NAME_RE = re.compile(IMAGE_NAME_PREFIX + r"([A-J]+).", re.DOTALL)


def image_code(name: str) -> int | None:
    """The image code an ``IMGIMG…`` token stands for (None for any other token); UserError for an ``IMGIMG``
    name whose digits are not spelled A..J followed by one final character."""
    if not name.startswith(IMAGE_NAME_PREFIX):
        return None
    m = _IMAGE_NAME_RE.fullmatch(name)
    if m is None:
        raise UserError(f"image token {name!r} is not IMGIMG + the code's digits spelled A-J + one final character; "
                        "is this a Chameleon tokenizer.json?")
    return int("".join(str(_DIGIT_LETTERS.index(c)) for c in m.group(1)))


def image_code_name(code: int, final: str = "Z") -> str:
    """Chameleon's token text for image code ``code`` (inverse of ``image_code``)."""
    return IMAGE_NAME_PREFIX + "".join(_DIGIT_LETTERS[int(d)] for d in str(code)) + final


@dataclass
class ChameleonVocab:
    """Their tokenizer.json rewritten into our id order, and the permutation between the two."""

    tokenizer_json: dict
    """Our tokenizer.json (as a dict): every id renumbered, image tokens renamed ``<img_…>``."""
    ours_to_theirs: list[int]
    """Their id of each of our ids."""
    codebook_size: int
    """Number of IMGIMG tokens (= image codes)."""
    text_vocab_size: int
    """Ids between the specials and the image codes."""
    specials: dict[str, str]
    """Role -> their token text of our first ids, in order: ``CHAMELEON_SPECIALS`` and, where their file has it,
    "eot" (``CHAMELEON_EOT``)."""

    @property
    def vocab_size(self) -> int:
        return len(self.ours_to_theirs)

    def theirs_to_ours(self) -> list[int]:
        return invert_permutation(self.ours_to_theirs)

    def vocabulary(self, grid: tuple[int, int], image_tokenizer_fingerprint: str) -> Vocabulary:
        """Our ``Vocabulary`` for an image tokenizer with code grid ``grid``."""

        n = len(self.specials)
        layout = VocabLayout(
            special_tokens=dict(self.specials), special_ids={role: i for i, role in enumerate(self.specials)},
            text_start=n, text_vocab_size=self.text_vocab_size, image_start=n + self.text_vocab_size,
            codebook_size=self.codebook_size, grid=tuple(grid), image_tokenizer_fingerprint=image_tokenizer_fingerprint,
            image_token_digits=_digits(self.codebook_size),
        )
        tok = Tokenizer.from_str(json.dumps(self.tokenizer_json))
        return Vocabulary(tok, layout, where="the vocabulary converted from Chameleon's tokenizer.json")


def invert_permutation(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, j in enumerate(order):
        inv[j] = i
    return inv


def _digits(codebook_size: int) -> int:
    return max(MIN_IMAGE_TOKEN_DIGITS, len(str(codebook_size - 1)))


def read_chameleon_vocab(model_dir: str | Path) -> ChameleonVocab:
    """Read ``model_dir/tokenizer.json`` and build our vocabulary's tokenizer.json and the permutation.

    UserError (one line) when the file is missing or unreadable, is not a BPE tokenizer, lacks a Chameleon
    special token or the IMGIMG tokens, has holes in its ids, or an image code is missing or duplicated."""

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; a Chameleon checkpoint directory holds tokenizer.json beside config.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(d))
    except Exception as e:  # JSON or tokenizers' own errors
        raise UserError(f"{path}: cannot be read as a tokenizers tokenizer.json ({' '.join(str(e).split())})") from e
    model = d.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: the tokenizer model is {model.get('type')!r}, not BPE; is this Chameleon's tokenizer.json?")

    token_of = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}  # the ids tokenizers really assigns
    n = len(token_of)
    if sorted(token_of) != list(range(n)):
        missing = sorted(set(range(max(token_of) + 1)) - set(token_of))
        raise UserError(f"{path}: the token ids are not 0..{n - 1} without holes (id {missing[0]} is missing)")
    specials = {}
    for role, text in CHAMELEON_SPECIALS.items():
        i = tok.token_to_id(text)
        if i is None:
            raise UserError(f"{path}: no {text!r} token ({role}); is this a Chameleon or Anole tokenizer.json?")
        specials[role] = i
    roles = dict(CHAMELEON_SPECIALS)
    if tok.token_to_id(CHAMELEON_EOT) is not None:
        specials["eot"], roles["eot"] = tok.token_to_id(CHAMELEON_EOT), CHAMELEON_EOT
    where = {}
    codes: dict[int, int] = {}  # their id -> code
    for i, t in token_of.items():
        code = image_code(t)
        if code is None:
            continue
        if code in where:
            raise UserError(f"{path}: image code {code} is spelled by two tokens, {token_of[where[code]]!r} and {t!r}")
        where[code], codes[i] = i, code
    if not codes:
        raise UserError(f"{path}: no {IMAGE_NAME_PREFIX}... image tokens; Chameleon's tokenizer.json names its image codes "
                        f"{image_code_name(0)}, {image_code_name(1)}, ...")
    size = len(codes)
    if max(where) != size - 1:
        gap = min(set(range(size)) - set(where))
        raise UserError(f"{path}: {size} {IMAGE_NAME_PREFIX} tokens but image code {gap} has none "
                        f"(the largest is {max(where)}); the image codes must be 0..{size - 1}")

    special_ids = set(specials.values())
    text_ids = [i for i in range(n) if i not in special_ids and i not in codes]
    ours_to_theirs = [specials[r] for r in roles] + text_ids + [where[c] for c in range(size)]
    out = _rewrite(d, token_of, ours_to_theirs, codes, size)
    return ChameleonVocab(tokenizer_json=out, ours_to_theirs=ours_to_theirs, codebook_size=size,
                          text_vocab_size=len(text_ids), specials=roles)


def _rewrite(d: dict, token_of: dict[int, str], ours_to_theirs: list[int], codes: dict[int, int], size: int) -> dict:
    """Their tokenizer.json with our ids: BPE vocab = specials + text; image tokens become added tokens."""
    theirs_to_ours = invert_permutation(ours_to_theirs)
    image_start = len(ours_to_theirs) - size
    digits = _digits(size)
    image_names = {token_of[i] for i in codes}
    id_of = {t: i for i, t in token_of.items()}

    out = json.loads(json.dumps(d))  # a deep copy
    model = out["model"]
    model["vocab"] = {token_of[ours_to_theirs[i]]: i for i in range(image_start)}
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in image_names and b not in image_names and a + b not in image_names:
            merges.append(m)
    model["merges"] = merges

    added = []
    for entry in d.get("added_tokens") or []:
        content = entry["content"]
        if content in image_names:
            continue  # re-added below, renamed, in code order
        added.append({**entry, "id": theirs_to_ours[id_of[content]]})
    added.sort(key=lambda e: e["id"])
    for code in range(size):
        added.append({"id": image_start + code, "content": image_token(code, digits), "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    out["added_tokens"] = added
    out["post_processor"] = _renumber(out.get("post_processor"), theirs_to_ours)
    if isinstance(out.get("padding"), dict) and isinstance(out["padding"].get("pad_id"), int):
        out["padding"]["pad_id"] = theirs_to_ours[out["padding"]["pad_id"]]
    return out


def _renumber(node, theirs_to_ours: list[int]):
    """Every token id inside a post processor (TemplateProcessing "ids", Bert/Roberta "cls"/"sep") renumbered."""
    if isinstance(node, list):
        return [_renumber(x, theirs_to_ours) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "ids" and isinstance(v, list) and all(isinstance(i, int) for i in v):
            out[k] = [theirs_to_ours[i] for i in v]
        elif k in ("cls", "sep") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
            out[k] = [v[0], theirs_to_ours[v[1]]]
        else:
            out[k] = _renumber(v, theirs_to_ours)
    return out
