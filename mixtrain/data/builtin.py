"""The built-in offline corpus: five domains made on any machine from a seed.

* ``code``: functions of the Python standard library's own source (read with ``ast``, never
  imported): prompt = signature + docstring, response = the body.
* ``docs``: prompt names a stdlib function or class, response = the first paragraph of its real
  docstring.
* ``math``: generated multi-step arithmetic word problems with worked answers.
* ``lego``: the LEGO task used by Skill-It (Zhang et al. 2022; Chen et al. 2023): a chain of
  ``n = 5`` variable assignments ``a = +1; b = -a; ...`` given in shuffled order; skill ``k``
  asks for the value of the ``k``-th variable of the chain (k hops of resolution). Sub-domains
  ``lego_1`` … ``lego_5``.
* ``addition``: 3-digit addition as in Skill-It; skill ``k`` asks for the ``k``-th digit of the
  sum counted from the right (needs the carries of the lower digits). Sub-domains
  ``addition_1`` … ``addition_3``.

Everything is a pure function of ``(name, size, seed)`` (and, for ``code``/``docs``, of the
running Python's stdlib sources).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from collections.abc import Iterator, Mapping
from functools import lru_cache

import numpy as np

from .sources import DataError, Record

__all__ = [
    "ADDITION_SKILLS",
    "BUILTIN_DOMAINS",
    "GENERATOR_VERSION",
    "LEGO_SKILLS",
    "builtin_domains",
    "builtin_size_for",
    "expand_builtin",
    "generate",
]

# Bump when a generator changes what it produces for the same (name, size, seed): it is part of
# the token cache's fingerprint.
GENERATOR_VERSION = 1

LEGO_SKILLS = 5
ADDITION_SKILLS = 3
BUILTIN_DOMAINS: tuple[str, ...] = (
    ("code", "docs", "math")
    + tuple(f"lego_{k}" for k in range(1, LEGO_SKILLS + 1))
    + tuple(f"addition_{k}" for k in range(1, ADDITION_SKILLS + 1))
)

# Pure-Python stdlib modules present in every CPython 3.9-3.13; missing ones are skipped.
_STDLIB_MODULES = (
    "textwrap", "string", "heapq", "bisect", "fractions", "statistics", "difflib", "calendar",
    "shlex", "fnmatch", "glob", "posixpath", "ntpath", "genericpath", "colorsys", "base64",
    "html", "csv", "pprint", "reprlib", "functools", "copy", "numbers", "operator", "ipaddress",
    "gettext", "random", "enum", "dataclasses", "argparse", "configparser", "tokenize",
    "tempfile", "shutil", "tarfile", "json.decoder", "json.encoder", "email.utils",
    "urllib.parse", "http.cookies", "logging", "quopri", "contextlib", "abc", "weakref",
    "ast", "inspect", "platform", "plistlib", "secrets", "selectors", "sched", "queue",
    "threading", "traceback", "linecache", "keyword", "codecs", "zipfile", "mimetypes",
    "uuid", "webbrowser", "wave", "cmd", "code", "codeop", "filecmp", "fileinput", "netrc",
    "optparse", "pathlib", "pickletools", "pydoc", "stat", "struct", "symtable", "tabnanny",
    "timeit", "trace", "types", "typing", "warnings", "zipapp",
)
_MAX_CODE_CHARS = 360
_MAX_DOC_CHARS = 240


def _rng(name: str, seed: int) -> np.random.Generator:
    key = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.Generator(np.random.Philox(key=[key, seed & (2**64 - 1)]))


@lru_cache(maxsize=1)
def _stdlib_defs() -> tuple[tuple[str, str, str, str, str], ...]:
    """(module, qualname, kind, header+docstring source, body source) for every documented def."""
    out = []
    for mod in _STDLIB_MODULES:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        lines = src.splitlines()

        def visit(node: ast.AST, prefix: str, lines: list[str] = lines, mod: str = mod) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = f"{prefix}{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and child.body and isinstance(child.body[0], ast.Expr):
                        first = child.body[0]
                        header = "\n".join(lines[child.lineno - 1 : first.end_lineno])
                        body = "\n".join(lines[first.end_lineno : child.end_lineno])
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        out.append((mod, qual, kind, header, body, doc))
                    if isinstance(child, ast.ClassDef):
                        visit(child, qual + ".", lines, mod)

        visit(tree, "")
    return tuple(out)


def _code_records() -> list[Record]:
    recs = []
    for mod, qual, kind, header, body, _doc in _stdlib_defs():
        if kind != "function" or not body.strip():
            continue
        # Dedent header and body together so the body keeps its indentation relative to `def`.
        full = textwrap.dedent(header + "\n" + body)
        n_head = len(header.splitlines())
        full_lines = full.splitlines()
        h, b = "\n".join(full_lines[:n_head]), "\n".join(full_lines[n_head:])
        if full_lines and full_lines[0][:1].isspace():
            continue  # a multi-line literal defeated dedent; skip rather than emit odd code
        if len(h) + len(b) > _MAX_CODE_CHARS or not b.strip():
            continue
        prompt = f"# module: {mod}\n{h}\n"
        recs.append(Record((("user", prompt), ("assistant", b))))
    return recs


def _docs_records() -> list[Record]:
    recs = []
    for mod, qual, kind, _h, _b, doc in _stdlib_defs():
        if qual.split(".")[-1].startswith("_"):
            continue
        para = inspect.cleandoc(doc).split("\n\n")[0].strip()
        if len(para) < 20 or len(para) > _MAX_DOC_CHARS:
            continue
        prompt = f"What does the {kind} `{mod}.{qual}` do?"
        recs.append(Record((("user", prompt), ("assistant", para))))
    return recs


def _pick(recs: list[Record], size: int, rng: np.random.Generator, name: str) -> list[Record]:
    if not recs:
        raise DataError(f"built-in domain {name!r} found no examples on this Python installation")
    perm = rng.permutation(len(recs))[: min(size, len(recs))]
    return [recs[i] for i in perm]


_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jo", "Kemal",
          "Lea", "Mina", "Noor", "Omar", "Pia")
_ITEMS = ("apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pencils")


def _math_problem(rng: np.random.Generator) -> Record:
    name = _NAMES[rng.integers(len(_NAMES))]
    friend = _NAMES[rng.integers(len(_NAMES))]
    item = _ITEMS[rng.integers(len(_ITEMS))]
    start = int(rng.integers(5, 60))
    packs, per = int(rng.integers(2, 9)), int(rng.integers(2, 12))
    give = int(rng.integers(1, start + packs * per))
    kind = int(rng.integers(3))
    bought = packs * per
    total = start + bought
    left = total - give
    if kind == 0:
        q = (f"{name} has {start} {item}. {name} buys {packs} boxes with {per} {item} each, "
             f"then gives {give} {item} to {friend}. How many {item} does {name} have now?")
        a = (f"{packs} * {per} = {bought}\n{start} + {bought} = {total}\n"
             f"{total} - {give} = {left}\nAnswer: {left}")
    elif kind == 1:
        share = int(rng.integers(2, 6))
        total2 = share * int(rng.integers(3, 20))
        each = total2 // share
        extra = int(rng.integers(1, 10))
        q = (f"{name} has {total2} {item} and shares them equally among {share} friends. "
             f"Each friend then finds {extra} more. How many {item} does each friend have?")
        a = f"{total2} / {share} = {each}\n{each} + {extra} = {each + extra}\nAnswer: {each + extra}"
    else:
        days = int(rng.integers(2, 8))
        rate = int(rng.integers(3, 15))
        used = int(rng.integers(1, rate))
        net = rate - used
        q = (f"Every day {name} collects {rate} {item} and loses {used}. {name} starts with "
             f"{start}. How many {item} does {name} have after {days} days?")
        a = (f"{rate} - {used} = {net} per day\n{net} * {days} = {net * days}\n"
             f"{start} + {net * days} = {start + net * days}\nAnswer: {start + net * days}")
    return Record((("user", q), ("assistant", a)))


_VARS = "abcdefghijklmnopqrstuvwxyz"


def _lego_problem(rng: np.random.Generator, skill: int) -> Record:
    names = [_VARS[i] for i in rng.permutation(26)[:LEGO_SKILLS]]
    signs = ["+" if s else "-" for s in rng.integers(0, 2, LEGO_SKILLS)]
    clauses = [f"{names[0]} = {signs[0]}1"]
    clauses += [f"{names[i]} = {signs[i]}{names[i - 1]}" for i in range(1, LEGO_SKILLS)]
    values = []
    v = 1
    for s in signs:
        v = v if s == "+" else -v
        values.append(v)
    order = rng.permutation(LEGO_SKILLS)
    prompt = "; ".join(clauses[i] for i in order) + f". What is {names[skill - 1]}?"
    steps = [f"{names[i]} = {'+' if values[i] > 0 else '-'}1" for i in range(skill)]
    return Record((("user", prompt), ("assistant", ", ".join(steps))))


def _addition_problem(rng: np.random.Generator, skill: int) -> Record:
    a, b = int(rng.integers(100, 1000)), int(rng.integers(100, 1000))
    carry = 0
    work = []
    digit = 0
    for k in range(skill):
        da, db = (a // 10**k) % 10, (b // 10**k) % 10
        s = da + db + carry
        work.append(f"{da}+{db}+{carry}={s}")
        digit, carry = s % 10, s // 10
    prompt = f"{a} + {b}. Digit {skill} of the sum, counting from the right?"
    return Record((("user", prompt), ("assistant", "; ".join(work) + f" -> {digit}")))


def generate(name: str, size: int, seed: int) -> list[Record]:
    """Records of one built-in (sub-)domain; a pure function of ``(name, size, seed)``."""
    rng = _rng(name, seed)
    if name == "code":
        return _pick(_code_records(), size, rng, name)
    if name == "docs":
        return _pick(_docs_records(), size, rng, name)
    if name == "math":
        return [_math_problem(rng) for _ in range(size)]
    kind, _, k = name.partition("_")
    if kind == "lego" and k.isdigit() and 1 <= int(k) <= LEGO_SKILLS:
        return [_lego_problem(rng, int(k)) for _ in range(size)]
    if kind == "addition" and k.isdigit() and 1 <= int(k) <= ADDITION_SKILLS:
        return [_addition_problem(rng, int(k)) for _ in range(size)]
    raise DataError(
        f"unknown built-in domain {name!r}; valid: code, docs, math, lego, addition, a real task or group "
        f"(`python -m mixtrain data list`), "
        f"{', '.join(BUILTIN_DOMAINS[3:])}"
    )


def expand_builtin(names: list[str]) -> Iterator[str]:
    """The domain names of ``data.builtin``: ``lego`` / ``addition`` become their skills."""
    for n in names:
        if n == "lego":
            yield from (f"lego_{k}" for k in range(1, LEGO_SKILLS + 1))
        elif n == "addition":
            yield from (f"addition_{k}" for k in range(1, ADDITION_SKILLS + 1))
        else:
            yield n


def builtin_size_for(name: str, size: int | Mapping[str, int], *, tasks: bool = False) -> int:
    """Examples of built-in domain ``name`` for ``data.builtin_size`` (a mapping's default is 400).
    ``tasks``: a real task, whose training rows are capped only when a size names it (or its
    family, or ``"*"``, or an int is given); otherwise it keeps them all."""
    if isinstance(size, int):
        return size
    family = name.partition("_")[0]
    for key in (name, family, "*"):
        if key in size:
            return int(size[key])
    return 1 << 62 if tasks else 400


def builtin_domains(names: list[str], *, size: int | Mapping[str, int], seed: int) -> list[tuple[str, list[Record]]]:
    """Expand ``lego``/``addition`` into skills and generate every requested domain.

    ``size``: examples per domain, or ``{domain | family | "*": n}`` (default 400)."""
    return [(n, generate(n, builtin_size_for(n, size), seed)) for n in expand_builtin(names)]
