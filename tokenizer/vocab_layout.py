"""Where everything lives in the merged id space: ``VocabLayout``, saved as a vocabulary's ``layout.json``.

::

    [ special tokens | text BPE tokens | image codes | grid tokens (optional) ]
      bos eos pad boi eoi   (text_vocab_size)   codebook_size   <row_end> <rows_1..H> <cols_1..W>

Grid tokens (``grid_tokens=True``) let images keep their aspect ratio: an image span states its grid and
breaks its rows, ``<boi> <rows_h> <cols_w> (w codes <row_end>) × h <eoi>``, for any grid up to ``grid``
(h ≤ H, w ≤ W), as Emu3 and Lumina-mGPT write theirs. Without them (Chameleon's layout) every image is
one fixed grid of ``grid`` codes in raster order, ``<boi> codes <eoi>``. ``image_span.SpanGrammar`` writes and reads
the spans of a layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from earlyfusion.core.checkpoint import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
LAYOUT_FILE = "layout.json"
HF_CONFIG_FILE = "tokenizer_config.json"
FORMAT = "earlyfusion.vocab"
VERSION = 1

# role -> token text; the order here is the order of their ids at the start of the vocabulary
SPECIAL_TOKENS: dict[str, str] = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "boi": "<boi>", "eoi": "<eoi>"}
# a vocabulary for conversations has these after them: who speaks next, and where a turn ends
CHAT_TOKENS: dict[str, str] = {"user": "<user>", "assistant": "<assistant>", "eot": "<eot>"}
IMAGE_TOKEN_PREFIX = "<img_"
MIN_IMAGE_TOKEN_DIGITS = 5
BYTE_ALPHABET = 256  # byte-level BPE always holds every byte as a token
ROW_END_TOKEN = "<row_end>"


def image_token(code: int, digits: int) -> str:
    """The token text of image code ``code``: ``<img_00042>``."""
    return f"{IMAGE_TOKEN_PREFIX}{code:0{digits}d}>"


def rows_token(n: int) -> str:
    """The token that says an image has ``n`` rows of codes."""
    return f"<rows_{n}>"


def cols_token(n: int) -> str:
    """The token that says an image has ``n`` codes per row."""
    return f"<cols_{n}>"


def _special_id(role: str) -> property:
    return property(lambda self: self.special_ids[role], doc=f"Id of the {role} token.")


@dataclass(frozen=True)
class VocabLayout:
    """Where everything lives in the merged id space (saved as ``layout.json``)."""

    special_tokens: dict[str, str]
    """Role ("bos", "eos", "pad", "boi", "eoi") -> token text."""
    special_ids: dict[str, int]
    """Role -> id."""
    text_start: int
    """First id of the text BPE range."""
    text_vocab_size: int
    """Number of text BPE ids (the 256 byte tokens included)."""
    image_start: int
    """Id of image code 0; image code c has id image_start + c."""
    codebook_size: int
    """Number of image codes (the image tokenizer's codebook)."""
    grid: tuple[int, int]
    """Code grid (h, w) of one image; with grid tokens, the largest grid (each side's maximum)."""
    image_tokenizer_fingerprint: str
    """``vq_fingerprint`` of the image tokenizer the image range was built for."""
    image_token_digits: int = MIN_IMAGE_TOKEN_DIGITS
    """Digits in the image token names (``<img_00042>``)."""
    grid_tokens: bool = False
    """Image spans state their grid (rows and columns tokens) and end each row with a row-end token, so any
    grid up to ``grid`` can be written; False: every image is exactly ``grid``."""

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(x) for x in self.grid))
        problems = self.problems()
        if problems:
            raise ValueError("invalid vocabulary layout: " + "; ".join(problems))

    # the special roles' ids by name, as a Vocabulary has them (the sampler reads a layout like a vocabulary)
    bos, eos, pad, boi, eoi = (_special_id(role) for role in SPECIAL_TOKENS)

    @property
    def chat(self) -> bool:
        """Whether conversations can be written: the vocabulary has an end-of-turn token, ours (``CHAT_TOKENS``, with
        the role markers) or an imported Chameleon's (``<reserved08706>``, no role markers)."""
        return "eot" in self.special_ids

    # derived ranges
    @property
    def text_end(self) -> int:
        return self.text_start + self.text_vocab_size

    @property
    def image_end(self) -> int:
        return self.image_start + self.codebook_size

    @property
    def grid_token_count(self) -> int:
        """Ids after the image range: row end, rows 1..H, columns 1..W (0 without grid tokens)."""
        return 1 + self.grid[0] + self.grid[1] if self.grid_tokens else 0

    @property
    def vocab_size(self) -> int:
        return self.image_end + self.grid_token_count

    @property
    def tokens_per_image(self) -> int:
        """Codes in the largest image (h·w of ``grid``)."""
        return self.grid[0] * self.grid[1]

    def grid_token_names(self) -> list[str]:
        """The grid tokens' texts in id order (empty without grid tokens)."""
        if not self.grid_tokens:
            return []
        return ([ROW_END_TOKEN] + [rows_token(n) for n in range(1, self.grid[0] + 1)]
                + [cols_token(n) for n in range(1, self.grid[1] + 1)])

    def problems(self) -> list[str]:
        """Every way the layout is inconsistent (empty list if it is fine)."""
        out = []
        allowed = (set(SPECIAL_TOKENS), set(SPECIAL_TOKENS) | set(CHAT_TOKENS), set(SPECIAL_TOKENS) | {"eot"})
        if set(self.special_tokens) not in allowed or set(self.special_ids) != set(self.special_tokens):
            out.append(f"special tokens must be exactly {sorted(SPECIAL_TOKENS)}, or those and {sorted(CHAT_TOKENS)}, "
                       "or those and eot")
            return out
        ids = sorted(self.special_ids.values())
        if ids != list(range(len(ids))):
            out.append(f"special ids must be 0..{len(ids) - 1} (got {self.special_ids})")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            out.append("special token texts must be distinct")
        if self.text_start != len(ids):
            out.append(f"text range must start right after the special ids at {len(ids)} (got {self.text_start})")
        if self.text_vocab_size < 1:
            out.append(f"text_vocab_size must be positive (got {self.text_vocab_size})")
        if self.image_start != self.text_end:
            out.append(f"image range must start right after the text range at {self.text_end} (got {self.image_start})")
        if self.codebook_size < 1:
            out.append(f"codebook_size must be positive (got {self.codebook_size})")
        if len(self.grid) != 2 or min(self.grid) < 1:
            out.append(f"grid must be two positive sizes (got {self.grid})")
        if self.image_token_digits < len(str(max(self.codebook_size - 1, 0))):
            out.append(f"image_token_digits {self.image_token_digits} too few for codebook_size {self.codebook_size}")
        if not isinstance(self.grid_tokens, bool):
            out.append(f"grid_tokens must be true or false (got {self.grid_tokens!r})")
        return out

    def image_token(self, code: int) -> str:
        return image_token(code, self.image_token_digits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        if not self.grid_tokens:  # a fixed-grid layout.json stays as it always was
            del d["grid_tokens"]
        return {"format": FORMAT, "version": VERSION, **d, "vocab_size": self.vocab_size,
                "tokens_per_image": self.tokens_per_image}

    @classmethod
    def from_dict(cls, d: dict, where: str = LAYOUT_FILE) -> VocabLayout:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a vocabulary layout (format must be {FORMAT!r}); "
                                  "is this a directory written by `earlyfusion vocab build`?")
        if d.get("version") != VERSION:
            raise CheckpointError(f"{where}: layout version {d.get('version')} is not {VERSION}; rebuild the vocabulary")
        names = {f for f in cls.__dataclass_fields__}
        try:
            layout = cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from e
        for derived in ("vocab_size", "tokens_per_image"):
            if derived in d and d[derived] != getattr(layout, derived):
                raise CheckpointError(f"{where}: {derived} {d[derived]} disagrees with the ranges ({getattr(layout, derived)})")
        return layout
