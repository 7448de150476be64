"""Atomic-file parsing and its errors, k-core filtering, the leave-one-out split with prefix augmentation,
and batch building, on hand-built examples."""

import zipfile

import numpy as np
import pytest
import torch

from mambakit.apps.recsys.data import (AtomicFile, AtomicFileError, SequenceCollator, TieWarning, build_sequences,
                                       find_atomic_files, fingerprint, interaction_counts, kcore_filter,
                                       leave_one_out, load_sequence_data, parse_header, read_atomic)

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
    with pytest.raises(AtomicFileError, match=r"holds no nope.inter file$"):
        find_atomic_files(folder, "nope")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_atomic_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtomicFileError, match=r"empty: holds no .inter file \(nor a ratings.csv\)$"):
        find_atomic_files(tmp_path / "empty")


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
    return build_sequences(users, items, times, name="toy", time_precision="float32", tie_break="file")


def test_remap_and_chronological_order():
    d = toy_data()                                                      # RecBole: tie_break file
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


# ---------------------------------------------------------------------------------------------- time order

def per_user(d):
    """{user token: [(item token, time), ...]} in sequence order."""
    return {d.user_tokens[u]: [(d.item_tokens[i], t) for i, t in zip(d.items[d.offsets[u]:d.offsets[u + 1]],
                                                                      d.times[d.offsets[u]:d.offsets[u + 1]])]
            for u in range(d.n_users)}


def random_interactions(seed, n=300, n_users=12, n_items=25, time_levels=6):
    rng = np.random.default_rng(seed)
    users = np.array([f"u{k}" for k in rng.integers(0, n_users, n)], dtype=object)
    items = np.array([f"i{k}" for k in rng.integers(0, n_items, n)], dtype=object)
    times = 1_000_000_000.0 + rng.integers(0, time_levels, n) * 1000.0      # many exact ties
    return users, items, times


def test_hash_tie_break_does_not_depend_on_row_order():
    users, items, times = random_interactions(0)
    d = build_sequences(users, items, times)                         # the defaults: float64, hash
    perm = np.random.default_rng(1).permutation(len(users))
    e = build_sequences(users[perm], items[perm], times[perm])
    assert d.item_tokens.tolist() == e.item_tokens.tolist()          # the same ids ...
    assert per_user(d) == per_user(e)                                 # ... and the same sequences
    np.testing.assert_array_equal(d.times, np.sort(d.times) if d.n_users == 1 else d.times)
    for u in range(d.n_users):                                        # chronological per user
        assert np.all(np.diff(d.times[d.offsets[u]:d.offsets[u + 1]]) >= 0)
    # "file" keeps file order among ties: another row order gives other sequences.
    f = build_sequences(users, items, times, tie_break="file")
    g = build_sequences(users[perm], items[perm], times[perm], tie_break="file")
    assert per_user(f) != per_user(g)


def test_hash_tie_break_is_not_item_order():
    # A user with 12 items at the same second, listed by ascending id (as MovieLens ratings.csv lists them):
    # file order keeps that order, the hash order must not be it (or any fixed function of the ids alone).
    items = np.array([f"m{k:02d}" for k in range(12)], dtype=object)
    users = np.array(["a"] * 12, dtype=object)
    times = np.full(12, 5.0)
    by_file = build_sequences(users, items, times, tie_break="file")
    by_hash = build_sequences(users, items, times)
    assert [t for t, _ in per_user(by_file)["a"]] == items.tolist()
    hashed = [t for t, _ in per_user(by_hash)["a"]]
    assert sorted(hashed) == items.tolist() and hashed != items.tolist() and hashed != items.tolist()[::-1]
    # Another user with the same items gets another order (the hash includes the user).
    two = build_sequences(np.array(["a"] * 12 + ["b"] * 12, dtype=object), np.concatenate([items, items]),
                          np.full(24, 5.0))
    assert [t for t, _ in per_user(two)["a"]] == hashed and [t for t, _ in per_user(two)["b"]] != hashed


def test_float32_rounding_ties_what_float64_orders():
    # 1e9 s in float32 is a multiple of 64: 1_000_000_010 and 1_000_000_030 both round to 1_000_000_000.
    users = np.array(["u", "u", "u"], dtype=object)
    items = np.array(["late", "early", "first"], dtype=object)
    times = np.array([1_000_000_030.0, 1_000_000_010.0, 999_999_000.0])
    exact = build_sequences(users, items, times, tie_break="file")
    rounded = build_sequences(users, items, times, time_precision="float32", tie_break="file")
    assert [t for t, _ in per_user(exact)["u"]] == ["first", "early", "late"]
    assert [t for t, _ in per_user(rounded)["u"]] == ["first", "late", "early"]    # tie: file order
    assert rounded.times.tolist()[1:] == [1_000_000_000.0, 1_000_000_000.0]
    assert exact.tie_share() == 0.0 and rounded.tie_share() == 0.5


def test_many_ties_warn_with_their_share(tmp_path):
    lines = [HEADER] + [f"u{u}\ti{i}\t1\t{100 + (i // 2)}" for u in range(3) for i in range(4)]
    write(tmp_path / "t.inter", lines)          # per user: pairs (0,1) and (2,3) tie -> 2 of 3 pairs = 67%
    with pytest.warns(TieWarning, match=r"67% of a user's consecutive interactions have equal timestamps "
                                        r"\(time_precision=float64\); their order is set by tie_break=hash"):
        d = load_sequence_data(tmp_path)
    assert d.stats["tie_share"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- fingerprints

def test_fingerprint_ignores_row_order_only():
    users, items, times = random_interactions(2)
    fp = fingerprint(users, items, times)
    perm = np.random.default_rng(0).permutation(len(users))
    moved = fingerprint(users[perm], items[perm], times[perm])
    assert moved["interactions"] == fp["interactions"] and moved["row_order"] != fp["row_order"]
    assert (fp["rows"], fp["users"], fp["items"]) == (300, len(set(users)), len(set(items)))
    times2 = times.copy()
    times2[7] += 1.0                                                  # one second later
    assert fingerprint(users, items, times2)["interactions"] != fp["interactions"]
    items2 = items.copy()
    items2[3] = "other"
    assert fingerprint(users, items2, times)["interactions"] != fp["interactions"]


def write_inter(path, users, items, times):
    return write(path, [HEADER] + [f"{u}\t{i}\t1\t{t:.0f}" for u, i, t in zip(users, items, times)])


def test_vocabulary_reads_reordered_data_identically_and_refuses_other_data(tmp_path):
    users, items, times = random_interactions(4)
    train_dir, moved_dir, other_dir = (tmp_path / n for n in ("train", "moved", "other"))
    for d in (train_dir, moved_dir, other_dir):
        d.mkdir()
    write_inter(train_dir / "x.inter", users, items, times)
    perm = np.random.default_rng(5).permutation(len(users))
    write_inter(moved_dir / "x.inter", users[perm], items[perm], times[perm])
    write_inter(other_dir / "x.inter", users[:-1], items[:-1], times[:-1])

    with pytest.warns(TieWarning):
        trained = load_sequence_data(train_dir, user_min=2, item_min=2)
    vocab = trained.vocabulary()
    with pytest.warns(TieWarning):
        again = load_sequence_data(moved_dir, user_min=2, item_min=2, vocabulary=vocab)
    assert again.item_tokens.tolist() == trained.item_tokens.tolist()
    np.testing.assert_array_equal(again.items, trained.items)
    np.testing.assert_array_equal(again.offsets, trained.offsets)
    with pytest.raises(AtomicFileError, match=r"x.inter: not the data this model was trained on \(299 "
                                              r"interactions.*training had 300"):
        load_sequence_data(other_dir, user_min=2, item_min=2, vocabulary=vocab)
    # tie_break=file: the row order decides ties, so a re-sorted file is refused, with the reason.
    with pytest.warns(TieWarning):
        file_vocab = load_sequence_data(train_dir, tie_break="file").vocabulary()
    with pytest.raises(AtomicFileError, match="same interactions as the training data, but in another row order"):
        load_sequence_data(moved_dir, tie_break="file", vocabulary=file_vocab)
    # Other filtering thresholds than at training: named, not a silent remap.
    with pytest.raises(AtomicFileError, match="filtering options differ from training"):
        load_sequence_data(train_dir, user_min=2, item_min=15, vocabulary=vocab)


def test_removed_items_are_recorded(tmp_path):
    lines = [HEADER] + [f"u{u}\ti{i}\t1\t{u * 10 + i}" for u in range(4) for i in range(3)] + ["u0\trare\t1\t99"]
    write(tmp_path / "r.inter", lines)
    d = load_sequence_data(tmp_path, user_min=2, item_min=2)
    assert d.removed_items == ("rare",) and d.vocabulary().removed_items == ("rare",)


def test_header_only_file_is_not_blamed_on_kcore(tmp_path):
    write(tmp_path / "h.inter", [HEADER])
    with pytest.raises(AtomicFileError, match=r"h.inter: holds no interactions \(a header and no data rows\)"):
        load_sequence_data(tmp_path, user_min=5, item_min=5)


# ---------------------------------------------------------------------------------------------- CSV

def test_movielens_ratings_csv(tmp_path):
    rows = ["userId,movieId,rating,timestamp", "1,31,2.5,1260759144", "1,1029,3.0,1260759179",
            "2,31,4.0,1260759100", "2,10,4.0,1260759101", "1,10,4.0,1260759100"]
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n31,Dangerous Minds (1995),Drama\n'
                                         '10,"GoldenEye, the (1995)",Action\n1029,Dumbo (1941),Animation\n')
    for path in (tmp_path / "ratings.csv", tmp_path):                # the file, or its MovieLens folder
        d = load_sequence_data(path)
        assert per_user(d) == {"1": [("10", 1260759100.0), ("31", 1260759144.0), ("1029", 1260759179.0)],
                               "2": [("31", 1260759100.0), ("10", 1260759101.0)]}
        titles = {d.item_tokens[i]: t for i, t in d.item_titles.items()}
        assert titles == {"31": "Dangerous Minds (1995)", "10": "GoldenEye, the (1995)", "1029": "Dumbo (1941)"}
    (tmp_path / "dates.csv").write_text("user,item,time\na,x,2020-01-01T00:00:10\na,y,2020-01-01T00:00:05\n")
    d = load_sequence_data(tmp_path / "dates.csv", user_field="user", item_field="item", time_field="time")
    assert per_user(d)["a"] == [("y", 1577836805.0), ("x", 1577836810.0)]
    (tmp_path / "bad.csv").write_text("uid,movieId,timestamp\n1,2,3\n")
    with pytest.raises(AtomicFileError, match=r"bad.csv: no column 'user_id' \(set data.user_field\); the header "
                                              r"has uid, movieId, timestamp"):
        load_sequence_data(tmp_path / "bad.csv")
    (tmp_path / "badtime.csv").write_text("userId,movieId,timestamp\n1,2,3\n1,3,soon\n")
    with pytest.raises(AtomicFileError, match=r"badtime.csv: column 'timestamp', line 3: 'soon' is not a unix"):
        load_sequence_data(tmp_path / "badtime.csv")
