"""Training batches streamed from code shards: memory independent of the corpus, exact mid-epoch resume.

Lanes. Row r of every global batch is lane r's: each lane packs its own rows (``rows.first_fit_row``, the rules
of ``packing``) from documents it draws itself, so a process reads only the lanes of its own rows (rows
[rank·B/world, (rank+1)·B/world)) and each DataLoader worker a share of those. What a lane reads depends on the seed,
the batch size and the data, never on the number of processes or workers: a run resumes exactly on another
number of either, as long as the batch size divides.

What a lane reads. A part (one code-shard directory) is cut into chunks: the checksummed blocks of its shards
(``code_shards.BLOCK_RECORDS`` records, the manifest's "block_records"). Epoch e is a permutation of the chunks (seeded by (seed, part, e)): a new order each epoch. Slots number
the chunks of all epochs one after another (slot s is chunk perm_e[s mod n], e = s div n) and lane r takes the slots
r, r + B, r + 2B, ...: every chunk of an epoch goes to exactly one lane, so within an epoch nothing is read twice
and nothing is skipped, over all lanes of all processes together. A lane reads its chunk in an order of its own
(seeded by the slot): the chunk is its shuffle buffer, one per lane, so a global batch mixes B chunks of the corpus.
Captions are tokenised as the lane reaches them, a few dozen at a time.

State. A lane's position is its draw count (the mixture and pair draws are a hash of (seed, lane, count)), its slot
count and offset in each part, and the documents in its look-ahead as (part, record, variant): a few integers. The
stream's ``state_dict`` gathers every process's lanes; ``load_state_dict`` takes each process's own back and re-reads
the look-ahead's records from their shards. No process holds more than its lanes' chunks and look-aheads.

First step. Opening a directory reads its manifest and stats its shards; each block is checked against its checksum
as it is read (``code_shards.ShardReader``): nothing passes over the corpus before the first batch, and nothing is
read twice to be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log

from .code_shards import CodeSet, ShardReader
from .config import PIPELINE_VERSION
from .distributed import gather_objects, gather_rows, rank_world
from .documents import READ, ContextTooShort, DocumentBuilder, pair_document, pair_overhead, span_words
from .records import SkipReport
from .rows import batch_of, first_fit_row, mixture_part, pair_variant, row_arrays

TOKENIZE_AHEAD = 64
"""Captions of a chunk tokenised together as a lane reaches them."""
_OPEN_SHARDS = 64  # shard readers a process keeps open
_MASK = (1 << 64) - 1


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _uniform(key: int, n: int) -> float:
    """The n-th uniform draw in [0, 1) of the stream ``key`` (splitmix64 of key + n): a pure function of both."""
    z = (key + (n + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class StreamPart:
    """One code-shard directory in the mixture; what the trainer's sizing reads of a part (kind, name, weight,
    ``len``, ``tokens``, ``n_views``) and the chunks lanes read. ``kind``: the manifest's, "pairs" (drawn as
    reading, drawing or unconditioned documents) or "text" / "interleaved" (documents as they are)."""

    n_views = 1

    def __init__(self, codes: CodeSet, weight: float):
        self.codes, self.name, self.weight = codes, str(codes.root), weight
        self.kind = codes.kind
        size = codes.block_records  # a chunk is a block: what one lane holds and shuffles at a time
        self.chunks = [(i, a, min(a + size, s.records)) for i, s in enumerate(codes.shards)
                       for a in range(0, s.records, size)]
        self._orders: OrderedDict[tuple, list[int]] = OrderedDict()
        self._tokens: float | None = None

    def __len__(self) -> int:
        return self.codes.records

    def chunk_of(self, seed: int, index: int, slot: int) -> tuple[int, int, int]:
        """(shard, first record, end) of the chunk in ``slot`` (part ``index`` of the mixture)."""
        n = len(self.chunks)
        epoch = slot // n
        key = (seed, index, epoch)
        if key not in self._orders:
            self._orders[key] = _perm(n, _seed_for(seed, "chunks", index, epoch))
            while len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self.chunks[self._orders[key][slot % n]]

    def tokens(self, vocab) -> float:
        """Tokens of one pass over the part, estimated from its first chunk (for the trainer's epoch count)."""
        if self._tokens is None:
            docs = self.codes.reader(0).documents_of(0, min(self.codes.block_records, self.codes.shards[0].records))
            ids = vocab.encode_texts([t if t.strip() else "" for _, texts in docs for t in texts])
            n = sum(map(len, ids)) + sum(vocab.span_length(c.shape) for images, _ in docs for c in images)
            n += 2 * len(docs)  # <s> and </s>
            self._tokens = n / max(len(docs), 1) * len(self)
        return self._tokens


@dataclass
class StreamedData:
    """What the trainer reads of the data before and while training (``PreparedData``'s summary fields)."""

    parts: list[StreamPart]
    report: SkipReport
    grids: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Spec:
    """What every lane of a stream shares."""

    parts: list[StreamPart]
    vocab: object
    T: int
    B: int
    seed: int
    reading_ratio: float
    cond_dropout: float
    reading_image_loss: bool
    cumulative: list[float]
    readers: OrderedDict = field(default_factory=OrderedDict)
    builder: DocumentBuilder | None = None
    """Cuts text and interleaved documents to the context as ``documents`` does (never to skip one: every document's
    images fit, ``check_documents_fit``)."""

    def __post_init__(self):
        self.builder = DocumentBuilder(self.vocab, self.T, strict=False)

    def reader(self, p: int, shard: int) -> ShardReader:
        key = (p, shard)
        if key in self.readers:
            self.readers.move_to_end(key)
        else:
            self.readers[key] = self.parts[p].codes.reader(shard)
            while len(self.readers) > _OPEN_SHARDS:
                self.readers.popitem(last=False)
        return self.readers[key]

    def caption_ids(self, captions: list[str]) -> list[np.ndarray]:
        """Caption ids, cut to what a pair leaves of the context (as ``documents`` cuts them)."""
        cap = self.T - pair_overhead(self.vocab)
        texts = [c if c.strip() else "" for c in captions]  # a blank caption is none: the pair is drawn unconditioned
        return [np.asarray(ids[:cap], np.int64) for ids in self.vocab.encode_texts(texts)]

    def documents(self, docs: list[tuple[list[np.ndarray], list[str]]], where: str) -> list[np.ndarray]:
        """The ids (int64) of text or interleaved documents: (images, text pieces before, between and after them)."""
        ids = iter(self.vocab.encode_texts([t for _, texts in docs for t in texts]))
        out = []
        for images, texts in docs:
            pieces = [("t", next(ids))]
            for image in images:
                pieces += [("i", image), ("t", next(ids))]
            pieces = [(k, x) for k, x in pieces if k == "i" or len(x)]
            doc = self.builder.document(pieces, where, "documents", SkipReport())
            if doc is None:  # its images alone overflow the context: refused at start from the manifest
                raise UserError(f"{where}: a document's images do not fit --context-len {self.T}; its manifest is "
                                "out of date: encode the corpus again")
            out.append(doc.astype(np.int64))
        return out


class _Chunk:
    """A lane's current chunk: its records in the lane's order, captions (documents) tokenised as they are reached."""

    def __init__(self, spec: _Spec, p: int, slot: int):
        self.slot, self.pairs = slot, spec.parts[p].kind == "pairs"
        shard, a, b = spec.parts[p].chunk_of(spec.seed, p, slot)
        self.start = spec.parts[p].codes.shards[shard].start + a
        self.where = f"{spec.parts[p].name}/{spec.parts[p].codes.shards[shard].name}"
        if self.pairs:
            self.codes, self.captions = spec.reader(p, shard).read(a, b)
        else:
            self.docs = spec.reader(p, shard).documents_of(a, b)
        self.order = _perm(b - a, _seed_for(spec.seed, "window", p, slot))
        self.ids: list[np.ndarray | None] = [None] * (b - a)

    def __len__(self) -> int:
        return len(self.order)

    def take(self, spec: _Spec, offset: int) -> tuple[int, np.ndarray | None, np.ndarray]:
        """(record index in the part, code grid, caption ids) of the pair at ``offset`` of the lane's order; a
        document's (record index, None, its ids)."""
        i = self.order[offset]
        if self.ids[i] is None:
            ahead = [j for j in self.order[offset:offset + TOKENIZE_AHEAD] if self.ids[j] is None]
            made = spec.caption_ids([self.captions[j] for j in ahead]) if self.pairs else \
                spec.documents([self.docs[j] for j in ahead], self.where)
            for j, ids in zip(ahead, made):
                self.ids[j] = ids
        return self.start + i, self.codes[i] if self.pairs else None, self.ids[i]


class _Lane:
    """One row of every batch: its draws, its place in each part, its look-ahead (see the module docstring)."""

    def __init__(self, spec: _Spec, lane: int, state: dict | None = None):
        self.spec, self.lane = spec, lane
        self.key = _seed_for(spec.seed, "lane", lane)
        self.draws = 0
        self.cursor = [[0, 0] for _ in spec.parts]  # per part: slots finished, offset in the current one
        self.chunks: list[_Chunk | None] = [None] * len(spec.parts)
        self.pending: list[tuple[tuple[int, int, int], np.ndarray, int]] = []  # ((part, record, variant), ids, untrained)
        if state is not None:
            self.draws = int(state["draws"])
            self.cursor = [[int(k), int(o)] for k, o in state["cursor"]]
            self.pending = [self._redraw(int(p), int(rec), int(v)) for p, rec, v in state["pending"]]

    def state(self) -> dict:
        return {"draws": self.draws, "cursor": [list(c) for c in self.cursor],
                "pending": [list(desc) for desc, _, _ in self.pending]}

    def _document(self, desc: tuple[int, int, int], codes: np.ndarray | None, ids: np.ndarray):
        spec = self.spec
        if codes is None:  # a text or interleaved document: as it is, every token trained
            return desc, ids, 0
        untrained = spec.vocab.span_length(codes.shape) if desc[2] == READ and not spec.reading_image_loss else 0
        return desc, pair_document(spec.vocab, codes, ids, desc[2]), untrained

    def _redraw(self, p: int, record: int, variant: int):
        """A look-ahead entry of a saved state, its record read again from its shard."""
        part = self.spec.parts[p]
        shard, row = part.codes.locate(record)
        reader = self.spec.reader(p, shard)
        if part.kind != "pairs":
            ids = self.spec.documents(reader.documents_of(row, row + 1), f"{part.name}/{part.codes.shards[shard].name}")
            return self._document((p, record, variant), None, ids[0])
        codes, captions = reader.read(row, row + 1)
        return self._document((p, record, variant), codes[0], self.spec.caption_ids(captions)[0])

    def _take(self, p: int) -> tuple[int, np.ndarray, np.ndarray]:
        spec = self.spec
        k, offset = self.cursor[p]
        slot = self.lane + k * spec.B
        chunk = self.chunks[p]
        if chunk is None or chunk.slot != slot:
            chunk = self.chunks[p] = _Chunk(spec, p, slot)
        record, codes, ids = chunk.take(spec, offset)
        self.cursor[p] = [k + 1, 0] if offset + 1 == len(chunk) else [k, offset + 1]
        if offset + 1 == len(chunk):
            self.chunks[p] = None  # read to its end: its memory goes before the next one is read
        return record, codes, ids

    def _draw(self):
        spec = self.spec
        r0, r1, r2 = (_uniform(self.key, 3 * self.draws + j) for j in range(3))
        self.draws += 1
        p = mixture_part(spec.cumulative, r0)
        record, codes, ids = self._take(p)
        variant = pair_variant(len(ids) > 0, r1, r2, spec.reading_ratio, spec.cond_dropout) if codes is not None else 0
        return self._document((p, record, variant), codes, ids)

    def row(self) -> list[tuple[np.ndarray, int]]:
        return [(doc, untrained) for _, doc, untrained in first_fit_row(self.pending, self._draw, self.spec.T)]


class _Lanes:
    """Lanes of one process (or one DataLoader worker): their next rows, their states."""

    def __init__(self, spec: _Spec, lanes: list[int], states: dict):
        self.spec = spec
        self.lanes = [_Lane(spec, lane, states.get(lane)) for lane in lanes]

    def rows(self) -> np.ndarray:
        return row_arrays([lane.row() for lane in self.lanes], self.spec.vocab.pad, self.spec.T)

    def states(self) -> dict:
        return {lane.lane: lane.state() for lane in self.lanes}


class _WorkerLanes(torch.utils.data.IterableDataset):
    """The process's lanes dealt out to DataLoader workers: worker w of W serves lanes[w::W] and yields, per batch,
    (its lanes, their rows, their states after them); a one-line error comes back as ("error", text)."""

    def __init__(self, spec: _Spec, lanes: list[int], states: dict, workers: int):
        self.spec, self.lanes, self.states, self.workers = spec, lanes, states, workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.lanes[info.id::self.workers] if info is not None else self.lanes
        try:
            group = _Lanes(self.spec, mine, self.states)
            while True:
                yield mine, group.rows(), group.states()
        except UserError as e:
            yield "error", str(e), None


class StreamedBatches:
    """Infinite iterator of packed global batches from code shards (see the module docstring); the interface of
    ``packing.PackedBatches`` (``data``, ``state_dict``, ``load_state_dict``, ``batches``).

    ``workers``: DataLoader worker processes that build the rows (0: this process). ``local``: return only this
    process's rows and gather nothing (``rank``/``world`` given; for tests and tools that split batches themselves)."""

    def __init__(self, parts: list[StreamPart], vocab, *, context_len: int, batch_size: int, reading_ratio: float,
                 cond_dropout: float, reading_image_loss: bool, seed: int, workers: int = 0,
                 report: SkipReport | None = None,
                 rank: int | None = None, world: int | None = None, local: bool = False):
        w = np.asarray([p.weight for p in parts], np.float64)
        self.spec = _Spec(parts, vocab, context_len, batch_size, seed, reading_ratio, cond_dropout, reading_image_loss,
                          list(np.cumsum(w / w.sum())))
        if rank is None or world is None:
            rank, world = rank_world()
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        per = batch_size // world
        self.lanes = list(range(rank * per, (rank + 1) * per))
        self.local, self.workers = local, min(workers, per)
        grids = sorted({g for p in parts for g in p.codes.grids})
        self.data = StreamedData(parts, report or SkipReport(), grids)
        self._states: dict = {}
        self._engine = None
        self.batches = 0

    @property
    def report(self) -> SkipReport:
        return self.data.report

    def __iter__(self) -> StreamedBatches:
        return self

    def _start(self):
        if self.workers == 0:
            return _Lanes(self.spec, self.lanes, self._states)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after the tokenizer ran
        loader = torch.utils.data.DataLoader(_WorkerLanes(self.spec, self.lanes, self._states, self.workers),
                                             batch_size=None, num_workers=self.workers, multiprocessing_context="fork")
        return iter(loader)

    def _local_rows(self) -> np.ndarray:
        if self._engine is None:
            self._engine = self._start()
        if isinstance(self._engine, _Lanes):
            return self._engine.rows()
        out = np.empty((len(self.lanes), 4, self.spec.T), np.int32)
        first = self.lanes[0]
        for _ in range(self.workers):  # one item from each worker, in turn: one batch
            lanes, rows, states = next(self._engine)
            if lanes == "error":
                raise UserError(rows)
            out[[lane - first for lane in lanes]] = np.asarray(rows)
            self._states.update(states)
        return out

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self._local_rows())
        if not self.local:
            rows = gather_rows(rows)
        self.batches += 1
        return batch_of(rows, self.spec.vocab)

    # ------------------------------------------------------------ exact resume
    def _signature(self) -> str:
        s = self.spec
        sig = [PIPELINE_VERSION, "stream", s.T, s.B, s.seed, s.reading_ratio, s.cond_dropout, s.reading_image_loss,
               [(round(p.weight, 12), p.codes.identity(), p.codes.block_records) for p in s.parts]]
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()

    def _own_states(self) -> dict:
        if isinstance(self._engine, _Lanes):
            return self._engine.states()
        return {lane: self._states.get(lane) or _Lane(self.spec, lane).state() for lane in self.lanes}

    def state_dict(self) -> dict:
        """Every lane's state (gathered from every process unless ``local``)."""
        lanes: dict = {}
        for part in ([self._own_states()] if self.local else gather_objects(self._own_states())):
            lanes.update({str(k): v for k, v in part.items()})
        return {"version": PIPELINE_VERSION, "signature": self._signature(), "lanes": lanes, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("signature") != self._signature():
            raise UserError("the data stream cannot be resumed exactly: the code shards, the context length, the batch "
                            "size, the seed or the mixture differ from the checkpoint's; resume with the same data and "
                            "options")
        missing = [lane for lane in self.lanes if str(lane) not in state["lanes"]]
        if missing:
            raise UserError(f"the checkpoint's data state has no lane {missing[0]}; resume with the same batch size")
        self._states = {lane: state["lanes"][str(lane)] for lane in self.lanes}
        self._engine = None
        self.batches = int(state["batches"])


def check_captions_fit(parts: list[StreamPart], vocab, context_len: int) -> None:
    """ContextTooShort unless every caption fits the context with its image, judged from the manifest without reading
    the shards: a byte-level BPE never makes more tokens than bytes, so a part whose longest caption in bytes fits,
    fits whole; otherwise each shard's longest caption (in bytes) is tokenised and must fit. A caption longer in
    tokens than that one is cut to fit when it is met, as ``documents`` cuts captions."""
    room = context_len - pair_overhead(vocab)
    for part in parts:
        if part.kind != "pairs":
            continue
        entries = part.codes.manifest["shards"]
        texts = [str(s.get("longest_caption") or "") for s in entries]
        if max((len(t.encode("utf-8")) for t in texts), default=0) <= room:
            continue
        for s, ids in zip(entries, vocab.encode_texts(texts)):
            if len(ids) > room:
                raise ContextTooShort(len(ids) + pair_overhead(vocab), context_len, f"{part.name}/{s['name']}", len(ids),
                                      span_words(vocab))


def check_documents_fit(parts: list[StreamPart], context_len: int) -> None:
    """UserError unless the images of every text or interleaved document fit the context with its ``<s>`` (from each
    shard's "most_image_tokens"): the text of a longer document is cut to fit when it is met, its images never are."""
    for part in parts:
        for s in part.codes.manifest["shards"] if part.kind != "pairs" else ():
            need = 1 + int(s.get("most_image_tokens") or 0)
            if need > context_len:
                raise UserError(f"{part.name}/{s['name']}: a document's images take {need} tokens with its <s>, more "
                                f"than --context-len {context_len}; raise --context-len (up to the decoder's "
                                "max_seq_len) or leave such documents out of the corpus")


def streamed_batches(cfg, specs, *, vocab, image_tokenizer_fingerprint: str, context_len: int, batch_size: int,
                     seed: int, fit_captions: bool) -> StreamedBatches:
    """The stream of the code-shard parts ``specs`` (``sources.PartSpec``) for the data options ``cfg``: every part
    must be code shards of the run's image tokenizer, in its vocabulary's grid mode."""
    tars = [s.source for s in specs if s.stream == "tar"]
    if tars:
        raise UserError(f"--data {tars[0]}: tar shards are encoded before training: `earlyfusion encode --data {tars[0]} "
                        "--image-tokenizer VQ --out CODES`, then train with --data CODES")
    other = [s.source for s in specs if s.stream != "codes"]
    if other:
        raise UserError(f"--data {other[0]}: code shards stream and are mixed only with other code shards; encode this "
                        "source too (`earlyfusion encode`), or train on it without the code shards")
    if (cfg.augment_views or 1) > 1:  # asked for, or added by the trainer for data it would repeat often
        log.warning("code shards hold one code grid per image, as it was encoded: no augmented views are shown")
    report = SkipReport()
    parts = []
    for s in specs:
        codes = CodeSet.open(s.location)
        if codes.kind != "text":  # text documents hold no codes: any run reads them
            codes.check_tokenizer(image_tokenizer_fingerprint, vocab.grid_tokens, "this run")
        for g in codes.grids:
            vocab.check_grid(g)
        report.records += int(codes.manifest.get("records", 0))
        for reason, n in (codes.manifest.get("skipped") or {}).items():
            report.records += int(n)
            report.counts[reason] += int(n)
        parts.append(StreamPart(codes, s.weight))
    if fit_captions:
        check_captions_fit(parts, vocab, context_len)
    check_documents_fit(parts, context_len)
    return StreamedBatches(parts, vocab, context_len=context_len, batch_size=batch_size, reading_ratio=cfg.reading,
                           cond_dropout=cfg.cond_dropout, reading_image_loss=cfg.reading_image_loss, seed=seed,
                           workers=cfg.loader_workers, report=report)
