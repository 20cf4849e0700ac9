"""The ``earlyfusion`` command: subcommands generated from each stage's config dataclass.

Each subcommand is (words, help, "module:ConfigClass", "module:function"). The options come from
the dataclass fields; each field's help is the string literal written under it (its docstring),
so ``--help`` documents every option and a misspelled option fails. Fields without a default are
required. ``bool`` fields become ``--flag / --no-flag``; ``list[...]`` fields take several values
(``--data A B`` or ``--data A --data B``). A field whose type is a dataclass contributes that
dataclass's fields as options of their own (named by ``field(metadata={"flag": ...})`` when given,
else by the field name), and the nested object is built back from them.

Errors a user can cause (``earlyfusion.core.errors.UserError``, a ValueError from a config's validation,
a usage error of argparse) print one line ``earlyfusion: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import importlib
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterator

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import setup_logging

COMMANDS: list[tuple[tuple[str, ...], str, str, str]] = [
    (("data", "shapes"), "generate the built-in shapes data set (image-caption pairs, interleaved docs, text; --sizes for non-square pictures)",
     "earlyfusion.training.shapes_data:ShapesConfig", "earlyfusion.training.shapes_data:generate_cmd"),
    (("data", "photos"), "crop the photographs that ship with scikit-image into an imagefolder (test: other photographs; val: new crops of the training ones)",
     "earlyfusion.training.photos:PhotosConfig", "earlyfusion.training.photos:generate_cmd"),
    (("data", "digits"), "write scikit-learn's 1,797 handwritten digits as a captioned imagefolder (train/val/test, one caption per digit; needs scikit-learn)",
     "earlyfusion.training.digits:DigitsConfig", "earlyfusion.training.digits:generate_cmd"),
    (("data", "shard"), "write an imagefolder as WebDataset tar shards (KEY.jpg|png|webp + KEY.txt, --shard-size records each)",
     "earlyfusion.training.data.shard_cmd:ShardConfig", "earlyfusion.training.data.shard_cmd:shard_cmd"),
    (("tokenizer", "train"), "train the VQ-VAE image tokenizer", "earlyfusion.training.vq_train:VQTrainConfig", "earlyfusion.training.vq_train:train_cmd"),
    (("tokenizer", "eval"), "evaluate an image tokenizer: PSNR, SSIM, codebook usage, perplexity, speed",
     "earlyfusion.training.vq_eval:VQEvalConfig", "earlyfusion.training.vq_eval:eval_cmd"),
    (("vocab", "build"), "build the merged text+image vocabulary (tokenizer.json + layout)",
     "earlyfusion.training.data.vocab_build:VocabBuildConfig", "earlyfusion.training.data.vocab_build:build_cmd"),
    (("encode",), "pre-tokenize a corpus (imagefolder or tar shards of image-caption pairs, an interleaved or text .jsonl) into code shards that train --data streams",
     "earlyfusion.training.data.encode:EncodeConfig", "earlyfusion.training.data.encode:encode_cmd"),
    (("train",), "train the unified decoder on interleaved text/image data", "earlyfusion.training.lm_config:TrainConfig", "earlyfusion.training.lm_train:train_cmd"),
    (("sample",), "sample text, images or interleaved output from a trained decoder", "earlyfusion.sampling.cli:SampleConfig", "earlyfusion.sampling.cli:sample_cmd"),
    (("eval",), "evaluate a trained decoder: losses, reading (captions), drawing (text-to-image) and conversations",
     "earlyfusion.evaluate:EvalConfig", "earlyfusion.evaluate:eval_cmd"),
    (("import", "chameleon"), "import a Chameleon / Anole checkpoint (transformers' format + Meta's VQGAN) as a run directory",
     "earlyfusion.convert:ImportChameleonConfig", "earlyfusion.convert:import_cmd"),
    (("export",), "export a run's decoder in transformers' Chameleon format (config.json, model.safetensors, tokenizer.json)",
     "earlyfusion.convert:ExportConfig", "earlyfusion.convert:export_cmd"),
]


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (``x: int = 1`` followed by ``\"\"\"help\"\"\"``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = constants_in(" ".join(b.value.value.split()), sys.modules.get(klass.__module__))
    return docs


_CONSTANT = re.compile(r"\{([A-Z][A-Z0-9_]*)((?:\[[\w-]+\])*)\}")


def constants_in(text: str, module) -> str:
    """``{NAME}`` or ``{NAME[key]...}`` in a help text replaced by that constant of the config's module, so the help
    says what the code does; anything else in braces is left as written."""
    def value(m: re.Match) -> str:
        if module is None or not hasattr(module, m.group(1)):
            return m.group(0)
        v = getattr(module, m.group(1))
        for key in re.findall(r"\[([\w-]+)\]", m.group(2)):
            v = v[key]
        return str(v)
    return _CONSTANT.sub(value, text)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _option_fields(cls, prefix: str = "") -> Iterator[tuple[dataclasses.Field, object, str, str, dict[str, str]]]:
    """(field, type, dest, flag, docs) for every option of ``cls``: a field whose type is itself a dataclass
    contributes its own fields (flattened; dest ``outer.inner``) instead of one option."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _option_fields(tp, f"{prefix}{f.name}.")
            continue
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        yield f, tp, prefix + f.name, flag, docs


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    seen: dict[str, str] = {}
    for f, tp, dest, flag, docs in _option_fields(cls):
        if flag in seen:
            raise TypeError(f"{cls.__name__}: option {flag} is declared by both {seen[flag]} and {dest}")
        seen[flag] = dest
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse expands %-formats in help
        kw: dict = {"dest": dest}
        if tp is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
            help_text += " (default: %(default)s)"
        else:
            origin = typing.get_origin(tp)
            if origin is list:
                (item,) = typing.get_args(tp)
                kw.update(nargs="+", type=item, action="extend")
                kw["default"] = None
            elif origin is typing.Literal:
                choices = typing.get_args(tp)
                kw.update(choices=choices, type=type(choices[0]), default=default)
            else:
                kw.update(type=tp, default=default)
            if has_default and default is not None and default != []:
                help_text += " (default: %(default)s)"
            if has_default and origin is list:
                kw["default"] = None
            if origin is not typing.Literal:
                kw["metavar"] = flag[2:].replace("-", "_").upper()
            if not has_default:
                kw["required"] = True
        parser.add_argument(flag, help=help_text, **kw)


def config_from_args(cls, ns: argparse.Namespace, prefix: str = ""):
    """The config object (nested dataclasses built back) from parsed options."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = config_from_args(tp, ns, f"{prefix}{f.name}.")
            continue
        v = getattr(ns, prefix + f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:
            continue
        values[f.name] = v
    return cls(**values)


class _Parser(argparse.ArgumentParser):
    """Usage errors (unknown option, bad value, missing option) as one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"earlyfusion: error: {' '.join(message.split())}\n")


def _selected(argv: list[str]) -> tuple[str, ...]:
    words = tuple(a for a in argv if not a.startswith("-"))
    for cmd, *_ in COMMANDS:
        if words[:len(cmd)] == cmd:
            return cmd
    return ()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the selected subcommand's config module is imported (all of them when argv is None)."""
    parser = _Parser(
        prog="earlyfusion",
        description="Discrete-token early-fusion models: image tokenizer -> vocabulary -> unified decoder -> sampling.",
        epilog="Pipeline: data shapes -> tokenizer train -> vocab build -> train -> sample / eval; or, from published "
               "weights: import chameleon -> sample / train --init-from. "
               "Run 'earlyfusion COMMAND --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, help_text, cfg_ref, fn_ref in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                g = top.add_parser(words[0], help=f"{words[0]} commands: " + ", ".join(
                    w[1] for w, *_ in COMMANDS if w[0] == words[0] and len(w) > 1))
                groups[words[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        if argv is None or _selected(argv) == words:
            add_config_args(sub, _load(cfg_ref))
        sub.set_defaults(_config=cfg_ref, _fn=fn_ref)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    ns = parser.parse_args(argv)

    setup_logging(ns.verbose)
    cls, fn = _load(ns._config), _load(ns._fn)
    try:
        try:
            cfg = config_from_args(cls, ns)
        except (ValueError, TypeError) as e:  # __post_init__ validation
            raise UserError(str(e)) from e
        result = fn(cfg)
    except UserError as e:
        print(f"earlyfusion: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"earlyfusion: error: {e.strerror}{where}; free space (or fix permissions, or raise the file-size limit) "
              "and run the command again "
              "(completed checkpoints are intact; training continues with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("earlyfusion: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
