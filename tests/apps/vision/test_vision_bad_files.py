"""Bad image files: found before a run starts (count and first files named), refused or left out by
data.bad_files, told in one line by the CLI (no traceback, also from a DataLoader worker), and `predict` reports
each bad file and predicts the others."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mambakit.apps.vision.config import AugmentConfig, DataConfig
from mambakit.apps.vision.data import build_datasets, check_image, find_bad_images, read_image
from mambakit.cli import main as cli
from mambakit.data import DataError

from test_vision_app import color_folder, tiny_recipe


def _encoded(fmt: str, seed: int = 0, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _corrupt_png_body() -> bytes:
    """A PNG whose compressed pixel data is damaged but whose end (IEND) is intact."""
    data = bytearray(_encoded("PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 64] = bytes(64)
    return bytes(data)


@pytest.fixture
def files(tmp_path):
    jpeg, png = _encoded("JPEG", size=(96, 80)), _encoded("PNG")
    made = {
        "good.jpg": jpeg, "good.png": png, "good.bmp": _encoded("BMP"),
        "trailer.jpg": jpeg + bytes(5000),                       # data after the end marker: still a good JPEG
        "truncated.jpg": jpeg[:len(jpeg) // 2], "cut_end.jpg": jpeg[:-2], "truncated.png": png[:len(png) // 2],
        "truncated.bmp": _encoded("BMP")[:-100], "header_only.jpg": jpeg[:10], "empty.png": b"",
        "text.jpg": b"not an image at all\n", "corrupt_body.png": _corrupt_png_body(),
    }
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_quick_check_finds_truncated_and_non_image_files(files):
    for name in ("good.jpg", "good.png", "good.bmp", "trailer.jpg"):
        assert check_image(files / name) is None, name
    for name in ("truncated.jpg", "cut_end.jpg", "truncated.png", "truncated.bmp", "header_only.jpg",
                 "empty.png", "text.jpg"):
        assert check_image(files / name) is not None, name
    with Image.open(files / "truncated.jpg") as img:     # the header alone reads: a header check would pass it
        assert img.size == (96, 80)
    assert "image file is truncated" in check_image(files / "truncated.jpg")
    # a damaged body with an intact end passes the quick check; the full decode finds it
    assert check_image(files / "corrupt_body.png") is None
    assert check_image(files / "corrupt_body.png", full=True) is not None
    names = ["good.jpg", "text.jpg", "good.png", "truncated.jpg"]
    assert [p for p, _ in find_bad_images([str(files / n) for n in names])] == [str(files / "text.jpg"),
                                                                               str(files / "truncated.jpg")]


def test_read_image_names_the_file(files):
    with pytest.raises(DataError, match=r"truncated.jpg: cannot read the image \(OSError: image file is truncated"):
        read_image(files / "truncated.jpg")
    with pytest.raises(DataError, match=r"missing.png: no such image"):
        read_image(files / "missing.png")
    assert read_image(files / "good.png", in_chans=1).mode == "RGB"


def _folder_with_bad_files(root, bad: dict):
    color_folder(root, n=6, splits=("train",))
    for name, data in bad.items():
        (root / "train" / "red" / name).write_bytes(data)
    return root


def test_dataset_with_a_truncated_jpeg_is_refused_or_the_file_left_out(tmp_path, capsys):
    jpeg = _encoded("JPEG")
    root = _folder_with_bad_files(tmp_path / "imgs", {"bad.jpg": jpeg[:len(jpeg) // 2]})
    cfg = DataConfig(source="imagefolder", root=str(root), img_size=8, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError) as info:
        build_datasets(cfg, AugmentConfig())
    message = str(info.value)
    assert "1 of 19 image files cannot be read" in message and str(root / "train" / "red" / "bad.jpg") in message
    assert "data.bad_files=skip" in message and "\n" not in message
    skip = DataConfig(**{**cfg.__dict__, "bad_files": "skip"})
    data = build_datasets(skip, AugmentConfig())
    kept = [p for split in (data.train, data.val, data.test) for p, _ in split.samples]
    assert len(kept) == 18 and not any(p.endswith("bad.jpg") for p in kept)
    assert "leaving out 1 of 19 image files" in capsys.readouterr().err
    # the good files keep the split they have without the bad one's neighbours moving
    assert sorted(data.test.samples) == sorted(s for s in build_datasets(skip, AugmentConfig()).test.samples)


def test_many_bad_files_are_counted_and_the_first_five_named(tmp_path):
    root = _folder_with_bad_files(tmp_path / "imgs", {f"bad{i}.png": b"" for i in range(7)})
    cfg = DataConfig(source="imagefolder", root=str(root), img_size=8)
    with pytest.raises(DataError, match=r"7 of 25 image files cannot be read .*bad4.png .*; and 2 more\. "):
        build_datasets(cfg, AugmentConfig())


def test_a_file_the_check_misses_fails_in_the_loader_with_its_name(tmp_path):
    root = _folder_with_bad_files(tmp_path / "imgs", {"bad.png": b"garbage"})
    cfg = DataConfig(source="imagefolder", root=str(root), img_size=8, val_fraction=0.0, scan="none")
    data = build_datasets(cfg, AugmentConfig())
    i = next(i for i, (p, _) in enumerate(data.train.samples) if p.endswith("bad.png"))
    with pytest.raises(DataError, match=r"bad.png: cannot read the image .*data.scan=full"):
        data.train[i]


def test_only_the_splits_a_run_reads_are_checked(tmp_path):
    root = color_folder(tmp_path / "imgs", n=6)                       # train/ and test/ folders
    (root / "train" / "red" / "bad.png").write_bytes(b"")
    cfg = DataConfig(source="imagefolder", root=str(root), img_size=8)
    with pytest.raises(DataError, match="1 of 25 image files"):
        build_datasets(cfg, AugmentConfig())
    data = build_datasets(cfg, AugmentConfig(), checked=("test",))
    assert any(p.endswith("bad.png") for split in (data.train, data.val) for p, _ in split.samples)
    (root / "test" / "red" / "bad.png").write_bytes(b"")
    with pytest.raises(DataError, match="1 of 7 image files"):
        build_datasets(cfg, AugmentConfig(), checked=("test",))


def _train(tmp_path, root, *overrides) -> tuple[int, str]:
    recipe = tiny_recipe(tmp_path, root)
    return cli(["vision", "train", "-c", str(recipe), "--run-dir", str(tmp_path / "runs" / "r"),
                "augment.mixup=0.0", "augment.cutmix=0.0", *overrides])


def test_cli_train_on_a_folder_with_a_bad_file(tmp_path, capsys, monkeypatch):
    jpeg = _encoded("JPEG")
    root = _folder_with_bad_files(tmp_path / "imgs", {"bad.jpg": jpeg[:len(jpeg) // 2]})
    assert _train(tmp_path, root) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mambakit: error: data: 1 of 19 image files cannot be read")
    assert "bad.jpg" in err and "data.bad_files=skip" in err
    monkeypatch.setenv("MAMBAKIT_DEBUG", "1")
    with pytest.raises(DataError):
        _train(tmp_path, root)


def test_cli_train_with_a_bad_file_found_only_by_the_loader(tmp_path, capsys):
    """data.scan=none: the file fails mid-epoch, in the main process and in a DataLoader worker alike."""
    root = _folder_with_bad_files(tmp_path / "imgs", {"bad.png": b"garbage"})
    for workers in ("0", "1"):
        assert _train(tmp_path, root, "data.scan=none", f"train.num_workers={workers}",
                      f"run.name=w{workers}") == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "DataLoader worker" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"mambakit: error: {root / 'train' / 'red' / 'bad.png'}: cannot read the image")
        assert last.endswith("and data.bad_files=skip leaves out those that fail"), last


def test_cli_predict_reports_each_bad_file_and_predicts_the_others(tmp_path, capsys):
    root = color_folder(tmp_path / "imgs")
    run = tmp_path / "runs" / "p"
    assert cli(["vision", "train", "-c", str(tiny_recipe(tmp_path, root)), "--run-dir", str(run)]) == 0
    good = [str(root / "test" / "red" / "0.png"), str(root / "test" / "blue" / "1.png")]
    png = (root / "test" / "red" / "0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "notes.jpg").write_text("hello")
    images = [good[0], str(tmp_path / "cut.png"), str(tmp_path / "missing.png"), good[1], str(tmp_path / "notes.jpg")]
    capsys.readouterr()
    assert cli(["vision", "predict", *images, "--checkpoint", str(run), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["image"] for r in out] == images
    assert [("top" in r, "error" in r) for r in out] == [(True, False), (False, True), (False, True),
                                                         (True, False), (False, True)]
    assert "cannot read the image" in out[1]["error"] and "no such image" in out[2]["error"]
    err = captured.err
    assert "Traceback" not in err
    for bad in images[1:3] + images[4:]:
        assert f"mambakit: error: {bad}" in err
    assert "3 of 5 images could not be read (listed above); the other 2 were predicted" in err
    # the good images get the predictions they get alone
    assert cli(["vision", "predict", good[0], good[1], "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [out[0], out[3]]
    assert cli(["vision", "predict", str(tmp_path / "notes.jpg"), "--checkpoint", str(run)]) == 1
    text = capsys.readouterr()
    assert "not predicted:" in text.out and "1 of 1 images could not be read" in text.err
    # eval reads (and checks) one split: a bad training file does not stop the test split's evaluation
    (root / "train" / "red" / "late.png").write_bytes(b"")
    assert cli(["vision", "eval", "--checkpoint", str(run), "--split", "test"]) == 0
    assert cli(["vision", "eval", "--checkpoint", str(run), "--split", "train"]) == 1
    assert "late.png" in capsys.readouterr().err
