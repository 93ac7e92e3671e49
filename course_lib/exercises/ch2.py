"""Chapter 2's exercises: an 80/20 split that keeps each category's balance, and dropping
(not cutting) the rows that are too long."""

from __future__ import annotations

from course_lib.exercises.core import Exercise

# 1. A split that keeps each category's balance ------------------------------------------

#: The check's rows: how many of each category (none a multiple of 5), interleaved.
CATEGORIES = {"open_qa": 16, "brainstorming": 11, "summarization": 8, "classification": 6}


def split_args(rank, size, group):
    import numpy as np

    labels = [c for c, n in CATEGORIES.items() for _ in range(n)]
    order = np.random.default_rng(2).permutation(len(labels))
    rows = [{"id": i + 1, "category": labels[j]} for i, j in enumerate(order)]
    return (rows,)


def my_split(rows):
    """Split rows 80/20 into training and validation, keeping each category's share.

    rows: a list of dicts, sorted by their "id" (an int), each with a "category" (a str).
    The rule: within each category, taking its rows in id order, the 5th, 10th, 15th, ...
    row goes to validation and every other row to training.
    Return (train_ids, valid_ids): two lists of the rows' "id"s, each sorted ascending.
    Plain Python is enough (import collections inside the function if you want it)."""
    raise NotImplementedError("your code here")


def split_solution(rows):
    seen = {}                            # category -> rows of it met so far
    train, valid = [], []
    for row in sorted(rows, key=lambda r: r["id"]):
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        (valid if seen[row["category"]] % 5 == 0 else train).append(row["id"])
    return sorted(train), sorted(valid)


def split_ignores_categories(rows):
    ordered = sorted(rows, key=lambda r: r["id"])
    valid = [r["id"] for i, r in enumerate(ordered) if i % 5 == 4]
    train = [r["id"] for i, r in enumerate(ordered) if i % 5 != 4]
    return sorted(train), sorted(valid)


def split_overlap(rows):
    seen, valid = {}, []
    for row in sorted(rows, key=lambda r: r["id"]):
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        if seen[row["category"]] % 5 == 0:
            valid.append(row["id"])
    return sorted(r["id"] for r in rows), sorted(valid)


def split_off_by_one(rows):
    seen = {}
    train, valid = [], []
    for row in sorted(rows, key=lambda r: r["id"]):
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        (valid if seen[row["category"]] % 5 == 1 else train).append(row["id"])
    return sorted(train), sorted(valid)


def split_swapped(rows):
    seen = {}
    train, valid = [], []
    for row in sorted(rows, key=lambda r: r["id"]):
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        (valid if seen[row["category"]] % 5 == 0 else train).append(row["id"])
    return sorted(valid), sorted(train)


def split_grouped(rows):
    by_category = {}                     # category -> its ids, categories in order of first row
    for row in sorted(rows, key=lambda r: r["id"]):
        by_category.setdefault(row["category"], []).append(row["id"])
    train, valid = [], []
    for ids in by_category.values():
        for i, row_id in enumerate(ids):
            (valid if i % 5 == 4 else train).append(row_id)
    return train, valid


def split_explain(got, want, args, rel):
    (rows,) = args
    valid = {int(i) for i in want[1]}
    parts = []
    for category in CATEGORIES:
        ids = [r["id"] for r in rows if r["category"] == category]
        parts.append(f"{category} {sum(i in valid for i in ids)} of {len(ids)}")
    return (f"every row is in exactly one list, and each category gives 1 in 5 of its rows to "
            f"validation ({', '.join(parts)}; {len(valid)} of {len(rows)} in all)")


split = Exercise(
    name="ch2.split", title="An 80/20 split that keeps each category's balance", ranks=1,
    make_args=split_args, reference=split_solution, stub=my_split, explain=split_explain,
    hint_text=("keep a counter per category (a dict: category -> rows seen so far). Walk the "
               "rows in id order, add 1 to the row's category, and send the row to validation "
               "when that count is a multiple of 5, to training otherwise. Return "
               "(sorted(train_ids), sorted(valid_ids))."),
    mistakes=[
        (split_ignores_categories, "your split ignores the categories (every 5th row overall): "
                                   "count the rows of each category separately and send that "
                                   "category's 5th, 10th, ... row to validation"),
        (split_overlap, "your training list also holds the validation rows: every row goes to "
                        "exactly one of the two lists"),
        (split_off_by_one, "you sent each category's 1st, 6th, 11th, ... row to validation: the "
                           "rule is the 5th, 10th, ... (counting from 1; with enumerate, "
                           "index % 5 == 4)"),
        (split_swapped, "you returned (valid_ids, train_ids): return the training ids first"),
        (split_grouped, "your rows are right but your lists are in category order: return "
                        "each list sorted by id (sorted(train_ids), sorted(valid_ids))"),
    ])


# 2. Drop long rows, don't cut them -------------------------------------------------------

MAX_TOKENS = 12

RECORDS = [
    "user: Name a sea bird. assistant: A gull, matey!",
    "user: What be the capital of France? assistant: Paris, me hearty, where the bread be "
    "long and the wine be red as a sunset.",
    "user: How many legs has a spider? assistant: Eight legs, matey, all hairy.",
    "user: Give me a word for happy. assistant: Jolly, like Roger!",
    "user: Summarise this passage about the Panama Canal for me. assistant: The canal joins "
    "two oceans, so ships no longer sail all the way round Cape Horn, which saves weeks of "
    "hard sailing.",
    "user: Tell me a colour. assistant: Blue.",
    "user: Why be the sea salty? assistant: Rivers carry salt from rocks.",
    "user: Name three knots. assistant: Bowline, reef and sheet bend.",
]


def drop_long_args(rank, size, group):
    def count_words(text):
        """A stand-in tokenizer: one token per whitespace-separated word."""
        return len(text.split())

    return list(RECORDS), count_words, MAX_TOKENS


def my_keep_short(records, count_tokens, max_tokens):
    """The records that fit in max_tokens tokens, for training.

    records: a list of str (each record's text as the model reads it, prompt then answer);
    count_tokens(text) -> int: the tokens of one record; max_tokens: an int.
    Return a list of the records whose token count is at most max_tokens, unchanged and in
    their original order (a long record is dropped, never shortened)."""
    raise NotImplementedError("your code here")


def drop_long_solution(records, count_tokens, max_tokens):
    return [r for r in records if count_tokens(r) <= max_tokens]


def drop_long_truncated(records, count_tokens, max_tokens):
    return [" ".join(r.split()[:max_tokens]) for r in records]


def drop_long_strict(records, count_tokens, max_tokens):
    return [r for r in records if count_tokens(r) < max_tokens]


def drop_long_inverted(records, count_tokens, max_tokens):
    return [r for r in records if count_tokens(r) > max_tokens]


def drop_long_counts(records, count_tokens, max_tokens):
    return [count_tokens(r) for r in records if count_tokens(r) <= max_tokens]


def drop_long_explain(got, want, args, rel):
    records, count_tokens, max_tokens = args
    dropped = [count_tokens(r) for r in records if count_tokens(r) > max_tokens]
    return (f"you kept {len(want)} of {len(records)} records whole (one of exactly "
            f"{max_tokens} tokens among them) and dropped the {len(dropped)} longer ones "
            f"({', '.join(map(str, dropped))} tokens)")


drop_long = Exercise(
    name="ch2.drop_long", title="Drop long rows, don't cut them", ranks=1,
    make_args=drop_long_args, reference=drop_long_solution, stub=my_keep_short,
    explain=drop_long_explain,
    hint_text=("one list comprehension: keep r when count_tokens(r) <= max_tokens. A record "
               "of exactly max_tokens tokens fits. Return the records themselves, not their "
               "counts and not shortened copies."),
    mistakes=[
        (drop_long_truncated, "you cut the long records to max_tokens: the answer comes last, "
                              "so a cut record teaches the model to stop mid-sentence (or holds "
                              "no answer at all); drop a record that is too long"),
        (drop_long_strict, "you dropped the record of exactly max_tokens tokens: it fits, so "
                           "keep it (<= max_tokens, not <)"),
        (drop_long_inverted, "you kept the long records and dropped the short ones: keep the "
                             "records with count_tokens(r) <= max_tokens"),
        (drop_long_counts, "you returned the kept records' token counts: return the records "
                           "themselves (the texts), unchanged"),
    ])
