"""MIL bags from MambaMIL's CSV and split formats."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mambakit.apps.pathology import data as D
from mambakit.apps.pathology.data import FeatureLayout


def _write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_feature_path_conventions(tmp_path):
    plain = FeatureLayout(features=str(tmp_path / "feats"))
    assert D.feature_path("A.svs", plain) == tmp_path / "feats" / "pt_files" / "A.pt"
    mm = FeatureLayout(layout="mambamil", backbone="plip", patch_size="512")
    assert D.feature_path("A", mm, row_dir="/d") == Path("/d/pt_files/plip/A.pt")
    mm256 = FeatureLayout(layout="mambamil", backbone="resnet50", patch_size="256")
    assert D.feature_path("A", mm256, row_dir="/d") == Path("/d/256/pt_files/resnet50/A.pt")
    surv = FeatureLayout(layout="mambamil", backbone="resnet50", data_root="/root")
    assert D.feature_path("TCGA-X.AB12.svs", surv, survival=True) == Path("/root/pt_files/resnet50/TCGA-X.AB12.pt")
    h5 = FeatureLayout(features="/f", format="h5")
    assert D.feature_path("A", h5) == Path("/f/h5_files/A.h5")
    with pytest.raises(ValueError, match="no features folder"):
        D.feature_path("A", FeatureLayout())
    with pytest.raises(ValueError, match="data_root"):
        D.feature_path("A", FeatureLayout(layout="mambamil"), survival=True)


def test_read_subtyping_csv(tmp_path):
    csv = _write(tmp_path / "l.csv", """
dir,case_id,slide_id,label
/d1,c1,s1,LUSC
/d2,c2,s2,LUAD
/d1,c3,s3,LUSC
""")
    bags, classes = D.read_subtyping_csv(csv, FeatureLayout(layout="mambamil"), classes=["LUAD", "LUSC"])
    assert classes == ["LUAD", "LUSC"] and [b.label for b in bags] == [1, 0, 1]
    assert bags[1].paths == [Path("/d2/pt_files/resnet50/s2.pt")]
    _, default = D.read_subtyping_csv(csv, FeatureLayout(features="/f"))
    assert default == ["LUAD", "LUSC"]                               # sorted labels
    with pytest.raises(ValueError, match="not among the classes"):
        D.read_subtyping_csv(csv, FeatureLayout(features="/f"), classes=["LUAD", "X"])
    bad = _write(tmp_path / "b.csv", "case_id,slide\nc1,s1")
    with pytest.raises(ValueError, match="missing column"):
        D.read_subtyping_csv(bad, FeatureLayout(features="/f"))
    dup = _write(tmp_path / "d.csv", "case_id,slide_id,label\nc1,s1,A\nc2,s1,B")
    with pytest.raises(ValueError, match="more than once"):
        D.read_subtyping_csv(dup, FeatureLayout(features="/f"))


def _upstream_bins(df: pd.DataFrame, n_bins=4, eps=1e-6):
    """MambaMIL's Generic_WSI_Survival_Dataset binning, transcribed."""
    patients_df = df.drop_duplicates(["case_id"]).copy()
    uncensored_df = patients_df[patients_df["censorship"] < 1]
    _, q_bins = pd.qcut(uncensored_df["survival_months"], q=n_bins, retbins=True, labels=False)
    q_bins[-1] = df["survival_months"].max() + eps
    q_bins[0] = df["survival_months"].min() - eps
    disc, _ = pd.cut(patients_df["survival_months"], bins=q_bins, retbins=True, labels=False, right=False,
                     include_lowest=True)
    return q_bins, disc.values.astype(int)


def test_read_survival_csv_bins_like_mambamil_and_concatenates_slides(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        months, cens = round(float(rng.exponential(30)), 1), int(rng.random() < 0.4)
        for j in range(1 + (i % 3 == 0)):                             # every third patient has two slides
            rows.append({"case_id": f"p{i}", "slide_id": f"p{i}_s{j}.svs", "censorship": cens,
                         "survival_months": months})
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "s.csv", index=False)
    feats = tmp_path / "f" / "pt_files"
    feats.mkdir(parents=True)
    for r in rows:
        torch.save(torch.full((2, 3), float(len(r["slide_id"]))), feats / f"{r['slide_id'][:-4]}.pt")
    bags, edges = D.read_survival_csv(tmp_path / "s.csv", FeatureLayout(features=str(tmp_path / "f")))
    ref_edges, ref_labels = _upstream_bins(df)
    np.testing.assert_allclose(edges, ref_edges)
    assert [b.label for b in bags] == list(ref_labels) and len(bags) == 40
    two = bags[0]
    assert two.slide_ids == ["p0_s0.svs", "p0_s1.svs"] and two.paths[0].name == "p0_s0.pt"
    assert D.load_bag(two).shape == (4, 3)
    bad = df.copy()
    bad.loc[0, "censorship"] = 2
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="censorship must be 0 or 1"):
        D.read_survival_csv(tmp_path / "bad.csv", FeatureLayout(features="/f"))
    bad = df.copy()
    bad.loc[1, "survival_months"] = 999.0                             # p0's second slide disagrees
    bad.to_csv(tmp_path / "bad2.csv", index=False)
    with pytest.raises(ValueError, match="different censorship"):
        D.read_survival_csv(tmp_path / "bad2.csv", FeatureLayout(features="/f"))


def test_read_split_and_select(tmp_path):
    split = _write(tmp_path / "splits_0.csv", """
,train,val,test
0,s1,s3,s4
1,s2,,
""")
    ids = D.read_split(split)
    assert ids == {"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]}
    bags = [D.Bag(s, [s], [Path(s)], 0) for s in ("s1", "s2", "s3", "s4")]
    assert [b.bag_id for b in D.select(bags, ["s2", "s1.svs"], "x")] == ["s2", "s1"]
    with pytest.raises(ValueError, match="not in the label CSV"):
        D.select(bags, ["s9"], "splits_0.csv column 'train'")
    overlap = _write(tmp_path / "splits_1.csv", ",train,val\n0,s1,s1")
    with pytest.raises(ValueError, match="both"):
        D.read_split(overlap)
    assert list(D.list_split_files(tmp_path)) == [0, 1]


def test_make_splits_are_stratified_and_disjoint():
    bags = [D.Bag(f"s{i}", [], [], i % 2) for i in range(40)]
    for split in D.make_splits(bags, n_folds=3, seed=1):
        parts = [set(split[k]) for k in ("train", "val", "test")]
        assert sum(map(len, parts)) == 40 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        labels = {f"s{i}": i % 2 for i in range(40)}
        assert sum(labels[i] for i in split["val"]) == 4 and len(split["val"]) == 8


def test_bag_dataset_and_collate(tmp_path):
    (tmp_path / "pt_files").mkdir()
    torch.save(torch.randn(5, 8), tmp_path / "pt_files" / "s1.pt")
    bag = D.Bag("s1", ["s1"], [tmp_path / "pt_files" / "s1.pt"], 1)
    ds = D.BagDataset([bag], in_dim=8, cache=True)
    item = ds[0]
    assert item["features"].shape == (5, 8) and item["label"].item() == 1
    batch = D.collate_bag([item])
    assert batch["features"].shape == (1, 5, 8) and batch["label"].shape == (1,)
    with pytest.raises(ValueError, match="batch_size must be 1"):
        D.collate_bag([item, item])
    with pytest.raises(ValueError, match="in_dim=16"):
        D.BagDataset([bag], in_dim=16)[0]
    missing = D.Bag("s2", ["s2"], [tmp_path / "pt_files" / "s2.pt"], 0)
    with pytest.raises(FileNotFoundError, match="s2.pt"):
        D.BagDataset([missing])[0]
    torch.save(torch.randn(0, 8), tmp_path / "pt_files" / "e.pt")
    with pytest.raises(ValueError, match="N >= 1"):
        D.load_features(tmp_path / "pt_files" / "e.pt")
