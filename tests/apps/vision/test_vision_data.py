"""Image folders, CSV lists, stratified splits, the MNIST sample's format, transforms, metrics."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from mambakit.apps.vision.config import AugmentConfig, DataConfig
from mambakit.apps.vision.data import (TensorImageDataset, build_datasets, class_names_for, load_mnist5k,
                                       read_csv_list, scan_image_folder, stratified_split)
from mambakit.apps.vision.metrics import classification_metrics, confusion_matrix, topk_accuracy


def write_images(root, classes, n, size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_with_carved_splits(tmp_path):
    write_images(tmp_path, ["b", "a", "c"], 10)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    samples, classes = scan_image_folder(tmp_path)
    assert classes == ["a", "b", "c"] and len(samples) == 30
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), img_size=8, val_fraction=0.2, test_fraction=0.3)
    data = build_datasets(cfg, AugmentConfig())
    assert (len(data.train), len(data.val), len(data.test)) == (15, 6, 9)          # per class: 5 / 2 / 3
    assert sorted(l for _, l in data.test.samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not set(data.train.samples) & set(data.test.samples)
    x, y = data.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    again = build_datasets(cfg, AugmentConfig())
    assert again.test.samples == data.test.samples                                  # seeded


def test_image_folder_with_split_folders_and_grey_images(tmp_path):
    write_images(tmp_path / "train", ["cat", "dog"], 4, mode="L")
    write_images(tmp_path / "validation", ["cat", "dog"], 2, mode="L")
    write_images(tmp_path / "test", ["dog"], 3, mode="L")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), img_size=8, in_chans=1)
    data = build_datasets(cfg, AugmentConfig(auto_augment=None))
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 3)
    assert data.classes == ["cat", "dog"] and {l for _, l in data.test.samples} == {1}
    assert data.val[0][0].shape == (1, 8, 8)
    write_images(tmp_path / "test", ["bird"], 1)
    with pytest.raises(ValueError, match=r"test/bird: class 'bird' is not among the training classes \(cat, dog\)"):
        build_datasets(cfg, AugmentConfig())


def test_csv_lists(tmp_path):
    write_images(tmp_path / "img", ["x"], 4)
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"img/x/{i}.png,{i % 2 + 1}\n" for i in range(4)))
    assert read_csv_list(tmp_path / "train.csv")[0] == (str(tmp_path / "img/x/0.png"), "1")
    cfg = DataConfig(source="csv", train_csv=str(tmp_path / "train.csv"), val_fraction=0.5, img_size=8)
    assert class_names_for(cfg) == ["1", "2"]
    data = build_datasets(cfg, AugmentConfig())
    assert len(data.train) == 2 and len(data.val) == 2 and data.test is None
    (tmp_path / "bad.csv").write_text("file,label\nimg/x/0.png,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: expected a header with columns 'path' and 'label'"):
        read_csv_list(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("path,label\nimg/x/0.png,1\nimg/x/9.png,2\n")
    with pytest.raises(FileNotFoundError, match=r"missing.csv:3: no such image"):
        read_csv_list(tmp_path / "missing.csv")


def test_stratified_split_is_per_class_and_seeded():
    labels = [0] * 10 + [1] * 20
    val, test, train = stratified_split(labels, [0.1, 0.2], seed=3)
    counts = lambda idx: (sum(labels[i] == 0 for i in idx), sum(labels[i] == 1 for i in idx))  # noqa: E731
    assert counts(val) == (1, 2) and counts(test) == (2, 4) and counts(train) == (7, 14)
    assert sorted(val + test + train) == list(range(30))
    assert stratified_split(labels, [0.1, 0.2], seed=3) == [val, test, train]
    assert stratified_split(labels, [0.1, 0.2], seed=4) != [val, test, train]


def test_mnist_file_format(tmp_path):
    rows = np.zeros((20, 785), dtype=np.int64)
    rows[:, 784] = np.arange(20) % 10
    rows[3, 5] = 255
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    images, labels = load_mnist5k(path)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8 and images[3, 0, 0, 5] == 255
    assert labels.tolist() == [i % 10 for i in range(20)]
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows[:, 1:], fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match="expected rows of 784 pixels and a label"):
        load_mnist5k(path)


def test_mnist_splits_hold_out_a_stratified_fifth(monkeypatch):
    import mambakit.apps.vision.data as data_mod

    images = torch.randint(0, 255, (500, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(500) % 10
    monkeypatch.setattr(data_mod, "load_mnist5k", lambda path=None: (images, labels))
    cfg = DataConfig(source="mnist5k", img_size=14, in_chans=1, val_fraction=0.1)
    data = build_datasets(cfg, AugmentConfig(random_shift=2))
    assert (len(data.train), len(data.val), len(data.test)) == (360, 40, 100)
    assert torch.bincount(data.test.labels).tolist() == [10] * 10
    x, _ = data.train[0]
    assert x.shape == (1, 14, 14)


def test_random_shift_translates_with_background():
    img = torch.zeros(1, 1, 5, 5) - 1.0
    img[0, 0, 2, 2] = 5.0
    ds = TensorImageDataset(img, torch.tensor([0]), random_shift=1)
    torch.manual_seed(0)
    seen = {tuple(torch.nonzero(ds[0][0][0] == 5.0)[0].tolist()) for _ in range(40)}
    assert seen <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(seen) > 3
    assert ds[0][0].min() == -1.0                                   # padding is the background


def test_metrics_against_direct_counts():
    logits = torch.tensor([[3.0, 1, 0, 2], [0, 3, 2, 1], [1, 0, 3, 2], [3, 2, 1, 0], [0, 1, 2, 3]])
    target = torch.tensor([0, 2, 0, 1, 3])
    assert topk_accuracy(logits, target, 1) == pytest.approx(2 / 5)
    assert topk_accuracy(logits, target, 2) == pytest.approx(4 / 5)
    cm = confusion_matrix(logits.argmax(1), target, 4)
    assert cm.tolist() == [[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    m = classification_metrics(logits, target, topk=2)
    assert m["acc"] == pytest.approx(0.4) and m["acc_top2"] == pytest.approx(0.8)
    assert m["balanced_acc"] == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())
