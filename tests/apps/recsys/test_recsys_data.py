"""Atomic-file parsing and its errors, k-core filtering, the leave-one-out split with prefix augmentation,
and batch building, on hand-built examples."""

import zipfile

import numpy as np
import pytest
import torch

from mambakit.apps.recsys.data import (AtomicFile, AtomicFileError, SequenceCollator, build_sequences,
                                       find_atomic_files, interaction_counts, kcore_filter, leave_one_out,
                                       load_sequence_data, parse_header, read_atomic)

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- headers

def test_header_parsing():
    assert parse_header(HEADER + "\n", "f") == {"user_id": "token", "item_id": "token", "rating": "float",
                                                 "timestamp": "float"}
    assert parse_header("movie_title:token_seq\tscores:float_seq", "f") == {"movie_title": "token_seq",
                                                                              "scores": "float_seq"}


@pytest.mark.parametrize("header, message", [
    ("user_id\titem_id:token", "header field 1 'user_id' is not of the form name:type"),
    ("user_id:token\t:token", "header field 2 ':token' is not of the form name:type"),
    ("user_id:\titem_id:token", "header field 1 'user_id:' is not"),
    ("user_id:token:x", "header field 1 'user_id:token:x' is not"),
    ("user_id:token\titem_id:int", "column 'item_id' has unknown type 'int'; expected one of token, token_seq"),
    ("a:token\ta:float", "column 'a' appears twice"),
    ("", "got an empty line"),
])
def test_header_errors_name_file_and_field(header, message):
    with pytest.raises(AtomicFileError, match="^data/x.inter: " + ".*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_header(header, "data/x.inter")


def test_read_atomic_types_and_values(tmp_path):
    f = write(tmp_path / "d.inter", [HEADER, "u1\ti1\t4\t10", "u1\ti2\t5\t2.5"])
    table = read_atomic(f, {"user_id": "token", "item_id": "token", "timestamp": "float"})
    assert list(table.frame.columns) == ["user_id", "item_id", "timestamp"]
    assert table.frame["user_id"].tolist() == ["u1", "u1"]
    assert table.frame["timestamp"].tolist() == [10.0, 2.5]
    assert table.types["rating"] == "float"


def test_missing_column_names_file_and_column(tmp_path):
    f = write(tmp_path / "d.inter", ["user_id:token\titem_id:token", "u\ti"])
    with pytest.raises(AtomicFileError, match=r"d.inter: missing column 'timestamp'; the header has "
                                              r"user_id:token, item_id:token"):
        read_atomic(f, {"user_id": "token", "item_id": "token", "timestamp": "float"})


def test_wrong_column_type(tmp_path):
    f = write(tmp_path / "d.inter", ["user_id:token\titem_id:token\ttimestamp:token", "u\ti\t1"])
    with pytest.raises(AtomicFileError, match=r"d.inter: column 'timestamp' has type 'token'; expected 'float'"):
        read_atomic(f, {"user_id": "token", "item_id": "token", "timestamp": "float"})


@pytest.mark.parametrize("value", ["yesterday", "", "nan", "inf"])
def test_non_numeric_timestamp(tmp_path, value):
    f = write(tmp_path / "d.inter", [HEADER, "u\ti\t1\t5", f"u\tj\t1\t{value}"])
    with pytest.raises(AtomicFileError, match=rf"d.inter: column 'timestamp' \(float\), line 3: '{value}' is "
                                              r"not a finite number"):
        read_atomic(f, {"timestamp": "float"})


def test_empty_token_and_wrong_field_count(tmp_path):
    f = write(tmp_path / "d.inter", [HEADER, "u\t\t1\t5"])
    with pytest.raises(AtomicFileError, match=r"d.inter: column 'item_id' \(token\), line 2: empty value"):
        read_atomic(f, {"item_id": "token"})
    f = write(tmp_path / "e.inter", [HEADER, "u\ti\t1\t5", "u\ti\t1"])
    with pytest.raises(AtomicFileError, match=r"e.inter: line 3 has 3 tab-separated fields, the header has 4"):
        read_atomic(f)


def test_find_files_in_folder_zip_and_errors(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "toy.inter", [HEADER, "u\ti\t1\t1"])
    write(folder / "toy.item", ["item_id:token\tmovie_title:token_seq", "i\tA Title"])
    files = find_atomic_files(folder)
    assert set(files) == {"inter", "item"} and files["inter"].path.name == "toy.inter"
    archive = tmp_path / "Toy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Toy/Toy.inter", HEADER + "\nu\ti\t1\t1\n")
        z.writestr("Toy/Toy.item", "item_id:token\ttitle:token\ni\tT\n")
    files = find_atomic_files(archive)
    assert files["inter"] == AtomicFile(archive, "Toy/Toy.inter") and files["item"].member == "Toy/Toy.item"
    assert read_atomic(files["inter"]).source == f"{archive}:Toy/Toy.inter"
    write(folder / "other.inter", [HEADER])
    with pytest.raises(AtomicFileError, match="several .inter files .*data.name"):
        find_atomic_files(folder)
    assert find_atomic_files(folder, "other")["inter"].path.name == "other.inter"
    with pytest.raises(AtomicFileError, match="holds no nope.inter"):
        find_atomic_files(folder, "nope")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_atomic_files(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- k-core

def test_kcore_reaches_the_fixed_point():
    # Items: a x3, b x2 (only u1, u2), c x1. With item_min=2, c goes; u3 then has 1 interaction and with
    # user_min=2 goes too, which leaves item a with 2 and b with 2: stable.
    # u4 has only d, e (each once) -> d, e banned in round 1 -> u4 empty.
    users = np.array(["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4"], dtype=object)
    items = np.array(["a", "b", "a", "b", "a", "c", "d", "e"], dtype=object)
    keep = kcore_filter(users, items, user_min=2, item_min=2)
    assert keep.tolist() == [True, True, True, True, False, False, False, False]
    # A cascade: with item_min=3, b (2) goes, then u1/u2 keep 1 item each -> banned; then a has 1 -> gone.
    assert not kcore_filter(users, items, user_min=2, item_min=3).any()
    # Every survivor meets both minimums, and no larger subset does (checked by brute force on this example).
    assert kcore_filter(users, items, 0, 0).all()


def test_kcore_random_is_a_fixed_point():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 600).astype(str).astype(object)
    items = rng.zipf(1.6, 600).astype(str).astype(object)
    keep = kcore_filter(users, items, 5, 4)
    assert 0 < keep.sum() < len(keep)
    _, uc = np.unique(users[keep], return_counts=True)
    _, ic = np.unique(items[keep], return_counts=True)
    assert uc.min() >= 5 and ic.min() >= 4
    assert kcore_filter(users[keep], items[keep], 5, 4).all()


def test_empty_after_kcore_is_an_error(tmp_path):
    f = write(tmp_path / "tiny.inter", [HEADER, "u\ti\t1\t1", "u\tj\t1\t2", "v\ti\t1\t3"])
    with pytest.raises(AtomicFileError, match=r"tiny.inter: no interactions remain after k-core filtering "
                                              r"\(users with >= 5 and items with >= 5.*3 interactions, 2 users "
                                              r"and 2 items"):
        load_sequence_data(tmp_path, user_min=5, item_min=5)


# ---------------------------------------------------------------------------------------------- sequences, split

def toy_data():
    # File order matters for ids (first appearance) and for ties (u1 has two interactions at t=5).
    users = np.array(["u1", "u2", "u1", "u1", "u2", "u1", "u3", "u3", "u4", "u5", "u5", "u5"], dtype=object)
    items = np.array(["x", "y", "z", "y", "x", "w", "x", "y", "z", "w", "x", "y"], dtype=object)
    times = np.array([5, 1, 5, 2, 3, 9, 1, 2, 1, 3, 2, 1], dtype=np.float64)
    return build_sequences(users, items, times, name="toy")


def test_remap_and_chronological_order():
    d = toy_data()
    assert d.item_tokens.tolist() == ["[PAD]", "x", "y", "z", "w"]     # first appearance in the file
    assert d.user_tokens.tolist() == ["u1", "u2", "u3", "u4", "u5"]
    assert d.offsets.tolist() == [0, 4, 6, 8, 9, 12]
    # u1: y@2, then x@5 and z@5 in file order, then w@9.
    assert d.items[0:4].tolist() == [2, 1, 3, 4]
    assert d.times[0:4].tolist() == [2, 5, 5, 9]
    assert d.items[9:12].tolist() == [2, 1, 4]                          # u5 sorted: y@1, x@2, w@3


def test_leave_one_out_split_and_prefixes():
    d = toy_data()
    split = leave_one_out(d)
    # u1 (4 interactions, 3 examples): train target 1, val 2, test 3. u2 (2 -> 1 example): train only.
    # u3 (2): train only. u4 (1): nothing. u5 (3 -> 2 examples): train target 10, test 11, no validation.
    assert split.train.target.tolist() == [1, 5, 7, 10]
    assert split.train.start.tolist() == [0, 4, 6, 9]
    assert split.val.target.tolist() == [2]
    assert split.test.target.tolist() == [3, 11]
    assert split.test.start.tolist() == [0, 9]

    batch = SequenceCollator(d, max_len=2, with_time=True).batch(split.test, [0, 1])
    # u1 test: history y x z, truncated to the last 2 -> x z; target w.
    assert batch["item_seq"].tolist() == [[1, 3], [2, 1]]
    assert batch["item_seq_len"].tolist() == [2, 2]
    assert batch["target"].tolist() == [4, 4]
    assert batch["time_seq"].tolist() == [[5, 5], [1, 2]]
    assert batch["time_seq"].dtype == torch.float64

    train = SequenceCollator(d, max_len=3).batch(split.train, [0, 3, 1])
    assert train["item_seq"].tolist() == [[2], [2], [2]]                # batch width = longest input
    assert train["target"].tolist() == [1, 1, 1]
    test = SequenceCollator(d, max_len=4).batch(split.test, [1, 0])
    assert test["item_seq"].tolist() == [[2, 1, 0], [2, 1, 3]]          # right-padded with 0
    fixed = SequenceCollator(d, max_len=3, fixed_length=True).batch(split.train, [0])
    assert fixed["item_seq"].tolist() == [[2, 0, 0]]


def test_prefix_augmentation_matches_recbole_loop():
    """Every prefix, truncated to the last max_len items, as RecBole's data_augmentation loop builds them."""
    rng = np.random.default_rng(3)
    n = 40
    users = rng.integers(0, 6, n).astype(str).astype(object)
    items = rng.integers(0, 15, n).astype(str).astype(object)
    times = rng.integers(0, 10, n).astype(np.float64)
    d = build_sequences(users, items, times)
    split = leave_one_out(d)
    max_len = 3
    expected = {"train": [], "val": [], "test": []}
    for u in range(d.n_users):
        seq = d.items[d.offsets[u]:d.offsets[u + 1]].tolist()
        examples = []
        seq_start = 0
        for i in range(1, len(seq)):                    # RecBole: seq_start moves when i - seq_start > max_len
            if i - seq_start > max_len:
                seq_start += 1
            examples.append((seq[seq_start:i], seq[i]))
        held = min(2, len(examples) - 1) if examples else 0
        expected["train"] += examples[:len(examples) - held]
        if held == 2:
            expected["val"].append(examples[-2])
        if held >= 1:
            expected["test"].append(examples[-1])
    for name in ("train", "val", "test"):
        examples = getattr(split, name)
        batch = SequenceCollator(d, max_len, fixed_length=True).batch(examples)
        got = [(row[:n].tolist(), t) for row, n, t in zip(batch["item_seq"], batch["item_seq_len"].tolist(),
                                                          batch["target"].tolist())]
        assert got == expected[name], name


def test_most_popular_counts_exclude_held_out_items():
    d = toy_data()
    counts = interaction_counts(d, leave_one_out(d))
    # Held out: u1's z (val) and w (test), u5's w (test). Remaining: x: u1,u2,u3,u5 = 4; y: u1,u2,u3,u5 = 4;
    # z: u4 = 1; w: 0.
    assert counts.tolist() == [0, 4, 4, 1, 0]


def test_load_with_titles_and_filtering(tmp_path):
    lines = [HEADER] + [f"u{u}\ti{i}\t1\t{u * 10 + i}" for u in range(4) for i in range(3)] + ["u9\ti7\t1\t1"]
    write(tmp_path / "m.inter", lines)
    write(tmp_path / "m.item", ["item_id:token\tmovie_title:token_seq\tyear:token", "i0\tZero Movie\t1990",
                                "i2\tTwo\t1991", "i7\tGone\t2000"])
    d = load_sequence_data(tmp_path, user_min=2, item_min=2)
    assert d.n_users == 4 and d.n_items == 4                            # u9 / i7 filtered out
    assert d.stats["raw_interactions"] == 13 and d.stats["interactions"] == 12
    assert {d.item_tokens[i]: t for i, t in d.item_titles.items()} == {"i0": "Zero Movie", "i2": "Two"}
