"""Feature extraction: CLAM's resnet50_trunc, weights handling, the output layout, resume, shards, errors."""

import json
import pickle

import numpy as np
import pytest
import torch

from mambakit.apps.pathology import features as F
from mambakit.apps.pathology.wsi import TileParams


def test_resnet50_trunc_is_torchvision_resnet50_cut_after_layer3():
    from torchvision.models import resnet50

    full = resnet50(weights=None).eval()
    trunc = F.resnet50_trunc().eval()
    trunc.load_state_dict(F.resnet50_trunc_from_torchvision(full.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        h = full.layer3(full.layer2(full.layer1(h)))
        expected = h.mean(dim=(2, 3))
        out = trunc(x)
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_resnet50_trunc_converter_rejects_other_state_dicts():
    with pytest.raises(ValueError, match="not a torchvision ResNet-50"):
        F.resnet50_trunc_from_torchvision({"conv1.weight": torch.zeros(1)})


def test_build_extractor_random_weights_is_loud():
    lines = []
    ex = F.build_extractor("timm:resnet18", random_weights=True, input_size=32, log=lines.append)
    assert ex.random_weights and ex.dim == 512 and ex.input_size == 32
    assert "RANDOM" in ex.meta()["weights"] and ex.meta()["random_weights"] is True
    assert any("RANDOM WEIGHTS" in line for line in lines)


def test_build_extractor_from_local_file_and_errors(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False).eval()     # with its classifier, as published
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    ex = F.build_extractor("timm:resnet18", weights=str(path), log=lambda *_: None)
    assert not ex.random_weights and str(path.resolve()) in ex.weights
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = src.forward_head(src.forward_features(x), pre_logits=True)
        torch.testing.assert_close(ex.model(x), expected)
    with pytest.raises(ValueError, match="not both"):
        F.build_extractor("timm:resnet18", weights=str(path), random_weights=True)
    with pytest.raises(ValueError, match="unknown backbone"):
        F.build_extractor("vgg", random_weights=True)
    with pytest.raises(ValueError, match="no registered weights"):
        F.build_extractor("timm:resnet18", log=lambda *_: None)
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not fit"):
        F.build_extractor("timm:resnet18", weights=str(tmp_path / "bad.pth"), log=lambda *_: None)


def test_hash_prefix_check(tmp_path):
    import hashlib

    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    F._check_hash_prefix(path, prefix)
    with pytest.raises(ValueError, match="published prefix"):
        F._check_hash_prefix(path, "00000000")


def test_shard_for_rank():
    items = list(range(7))
    assert F.shard_for_rank(items, 0, 3) == [0, 3, 6]
    assert F.shard_for_rank(items, 2, 3) == [2, 5]
    assert sorted(sum((F.shard_for_rank(items, r, 3) for r in range(3)), [])) == items
    with pytest.raises(ValueError):
        F.shard_for_rank(items, 3, 3)


def _params(small_tile_params, **kw):
    base = dict(backbone="timm:resnet18", random_weights=True, batch_size=8, num_workers=0, input_size=32,
                tile=TileParams(patch_size=128, magnification=20, seg=small_tile_params.seg, thumbnail_size=0))
    base.update(kw)
    return F.ExtractParams(**base)


def test_extract_slides_layout_resume_and_failures(slide_factory, tmp_path, small_tile_params):
    import h5py

    folder = tmp_path / "slides"
    slide_factory("s1", folder=folder, seed=1)
    slide_factory("s2", folder=folder, seed=2, disks=[(300, 300, 200)])
    (folder / "broken.svs").write_bytes(b"garbage")
    out = tmp_path / "feats"
    lines = []
    results = F.extract_slides(folder, out, _params(small_tile_params, num_workers=1), progress=False, log=lines.append)
    status = {r.slide_id: r.status for r in results}
    assert status == {"broken": "failed", "s1": "ok", "s2": "ok"}
    for sid in ("s1", "s2"):
        feats = torch.load(out / "pt_files" / f"{sid}.pt", weights_only=True)
        coords_tile = h5py.File(out / "patches" / f"{sid}.h5", "r")["coords"][:]
        with h5py.File(out / "h5_files" / f"{sid}.h5", "r") as f:
            np.testing.assert_allclose(f["features"][:], feats.numpy())
            np.testing.assert_array_equal(f["coords"][:], coords_tile)
            assert f["coords"].attrs["patch_level"] == 0 and f.attrs["random_weights"]
        assert feats.shape == (len(coords_tile), 512) and feats.dtype == torch.float32
    meta = json.loads((out / "features_meta.json").read_text())
    assert meta["backbone"] == "timm:resnet18" and meta["random_weights"] is True
    summary = (out / "extract_summary.csv").read_text()
    assert "broken" in summary and "unreadable" in summary
    # resumable: finished slides are skipped, the broken one is tried again
    again = {r.slide_id: r.status for r in F.extract_slides(folder, out, _params(small_tile_params), progress=False,
                                                            log=lambda *_: None)}
    assert again == {"broken": "failed", "s1": "skipped", "s2": "skipped"}


def test_extract_refuses_to_mix_extractors(slide_factory, tmp_path, small_tile_params):
    folder = tmp_path / "slides"
    slide_factory("s1", folder=folder)
    out = tmp_path / "feats"
    F.extract_slides(folder, out, _params(small_tile_params), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"differs from this run in input_size: 32 vs 48\b") as e:
        F.extract_slides(folder, out, _params(small_tile_params, input_size=48), progress=False, log=lambda *_: None)
    assert "backbone" not in str(e.value)             # only what differs is named


def test_extract_shards_by_rank_and_uses_given_coords(slide_factory, tmp_path, small_tile_params):
    from mambakit.apps.pathology.wsi import tile_slides

    folder = tmp_path / "slides"
    for i in range(3):
        slide_factory(f"s{i}", folder=folder, seed=i)
    tile_slides(folder, tmp_path / "tiles", small_tile_params, progress=False, log=lambda *_: None)
    out = tmp_path / "feats"
    done = F.extract_slides(folder, out, _params(small_tile_params), coords_dir=tmp_path / "tiles", rank=1,
                            world_size=2, progress=False, log=lambda *_: None)
    assert [r.slide_id for r in done] == ["s1"]
    assert sorted(p.stem for p in (out / "pt_files").iterdir()) == ["s1"]
    assert (out / "extract_summary.rank1.csv").is_file()
    assert not (out / "patches").exists()            # coordinates came from --coords


def test_extract_reports_missing_coords(slide_factory, tmp_path, small_tile_params):
    folder = tmp_path / "slides"
    slide_factory("s1", folder=folder)
    (tmp_path / "tiles" / "patches").mkdir(parents=True)
    results = F.extract_slides(folder, tmp_path / "feats", _params(small_tile_params), coords_dir=tmp_path / "tiles",
                               progress=False, log=lambda *_: None)
    assert results[0].status == "failed" and results[0].error_kind == "no_coords"


def test_extract_reports_an_unreadable_slide_as_unreadable_not_as_missing_coords(tmp_path, small_tile_params):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "broken.svs").write_bytes(b"not a slide")
    (tmp_path / "tiles" / "patches").mkdir(parents=True)
    results = F.extract_slides(folder, tmp_path / "feats", _params(small_tile_params), coords_dir=tmp_path / "tiles",
                               progress=False, log=lambda *_: None)
    assert results[0].status == "failed" and results[0].error_kind == "unreadable"
    assert "OpenSlide cannot read" in results[0].error


def test_patch_dataset_pickles_without_its_handle(slide_factory):
    from mambakit.apps.pathology.wsi import geometry_from_attrs

    path = slide_factory("s1")
    geometry = geometry_from_attrs({"patch_level": 0, "patch_size": 64})
    ds = F.PatchDataset(path, np.array([[100, 100], [200, 200]]), geometry, 32, F.IMAGENET_MEAN, F.IMAGENET_STD)
    x = ds[0]
    assert x.shape == (3, 32, 32) and ds._slide is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None
    torch.testing.assert_close(clone[0], x)


def test_random_weights_are_the_same_in_every_process():
    a = F.build_extractor("timm:resnet18", random_weights=True, log=lambda *_: None)
    torch.manual_seed(123)                        # the global RNG state does not matter
    b = F.build_extractor("timm:resnet18", random_weights=True, log=lambda *_: None)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_batchnorm_calibration_for_random_weights(slide_factory, tmp_path, small_tile_params):
    import h5py

    folder = tmp_path / "slides"
    for i in range(2):
        slide_factory(f"s{i}", folder=folder, seed=i)
    outs = []
    for run in ("a", "b"):
        lines = []
        F.extract_slides(folder, tmp_path / run, _params(small_tile_params, calibrate_bn=12), progress=False,
                         log=lines.append)
        assert any("BatchNorm statistics" in line for line in lines)
        outs.append(torch.load(tmp_path / run / "pt_files" / "s0.pt", weights_only=True))
        meta = json.loads((tmp_path / run / "features_meta.json").read_text())
        assert meta["batchnorm_calibration"] == {"patches": 12, "slides": ["s0"]}
    torch.testing.assert_close(outs[0], outs[1])                     # deterministic: ranks and resumes agree
    done = F.extract_slides(folder, tmp_path / "plain", _params(small_tile_params), progress=False, log=lambda *_: None)
    assert [r.status for r in done] == ["ok", "ok"], [r.error for r in done]
    plain = torch.load(tmp_path / "plain" / "pt_files" / "s0.pt", weights_only=True)
    assert not torch.allclose(plain, outs[0])                        # the statistics changed the features
    with pytest.raises(ValueError, match="random-weights only"):
        F.ExtractParams(weights="x.pth", calibrate_bn=10)
    ex = F.build_extractor("timm:resnet18", weights=None, random_weights=True, log=lambda *_: None)
    ex.random_weights = False
    with pytest.raises(ValueError, match="only for random weights"):
        F.calibrate_batchnorm(ex, [], 4, 2, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# hed_stats: the weight-free stain / texture descriptor

def _hed_params(small_tile_params, **kw):
    return _params(small_tile_params, **{"backbone": "hed_stats", "random_weights": False, "input_size": None, **kw})


def test_hed_matches_scikit_image_rgb2hed():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 20, 24, 3)).astype(np.uint8)
    images[0, :4] = 0                                       # black pixels: the log's floor
    x = torch.from_numpy(images / 255.0).permute(0, 3, 1, 2).float()
    ours = F.StainTextureFeatures().hed(x).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, np.stack([rgb2hed(im) for im in images]), atol=2e-6)


def test_hed_stats_descriptor_against_numpy_by_hand():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    x = torch.from_numpy(image / 255.0).permute(2, 0, 1)[None].float()
    out = F.StainTextureFeatures()(x)[0].double().numpy()
    assert out.shape == (46,)
    rgb = image / 255.0
    hi, lo = rgb.max(-1), rgb.min(-1)
    channels = np.concatenate([rgb2hed(image), rgb, ((hi - lo) / np.maximum(hi, 1e-6))[..., None]], -1)
    channels = channels.reshape(-1, 7).T                                    # H, E, D, R, G, B, S
    expected = np.concatenate([channels.mean(1), channels.std(1, ddof=1),
                               *np.quantile(channels, [0.1, 0.5, 0.9], axis=1)])
    np.testing.assert_allclose(out[:35], expected, rtol=1e-4, atol=1e-5)
    grey = rgb.mean(-1)
    detail = grey - np.repeat(np.repeat(grey.reshape(8, 2, 8, 2).mean((1, 3)), 2, 0), 2, 1)
    assert out[40] == pytest.approx(np.sqrt((detail ** 2).mean()), rel=1e-4)      # finest band of grey
    gx, gy = np.diff(grey, axis=1)[:-1], np.diff(grey, axis=0)[:, :-1]
    assert out[44] == pytest.approx(np.sqrt(gx ** 2 + gy ** 2).mean(), rel=1e-4)    # gradient of grey
    assert out[45] == pytest.approx((-np.log(np.maximum(rgb, 1e-6))).sum(-1).__gt__(0.15).mean())


def test_hed_stats_separates_stains():
    """Haematoxylin-blue pixels score high on H, eosin-pink on E, DAB-brown on D."""
    def patch(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 8, 8) / 255
    m = F.StainTextureFeatures()
    blue, pink, brown = (m(patch(c))[0] for c in ((70, 60, 150), (230, 150, 190), (150, 100, 50)))
    assert blue[0] > pink[0] and blue[0] > brown[0]           # H mean
    assert pink[1] > blue[1] - 1e-6 and brown[2] > max(blue[2], pink[2])   # E, D means


def test_hed_stats_extraction_is_standardised_and_resumes(slide_factory, tmp_path, small_tile_params):
    folder = tmp_path / "slides"
    slide_factory("s1", folder=folder, seed=1)
    out = tmp_path / "feats"
    lines = []
    results = F.extract_slides(folder, out, _hed_params(small_tile_params, standardize=10_000), progress=False,
                               log=lines.append)
    assert results[0].status == "ok" and not any("RANDOM" in line for line in lines)
    meta = json.loads((out / "features_meta.json").read_text())
    assert meta["backbone"] == "hed_stats" and meta["dim"] == 46 and meta["input_size"] == 64
    assert meta["random_weights"] is False and meta["batchnorm_calibration"] is None
    std = meta["standardization"]
    feats = torch.load(out / "pt_files" / "s1.pt", weights_only=True).double()
    assert std["patches"] == len(feats) and std["slides"] == ["s1"]    # every patch: column mean 0, std 1
    varying = torch.tensor(std["std"]) != 1.0
    torch.testing.assert_close(feats.mean(0), torch.zeros(46, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.std(0)[varying], torch.ones(int(varying.sum()), dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # a second slide into the same folder reuses the recorded standardisation (no refusal, same meta)
    slide_factory("s2", folder=folder, seed=2, disks=[(300, 300, 200)])
    again = F.extract_slides(folder, out, _hed_params(small_tile_params, standardize=10_000), progress=False,
                             log=lines.append)
    assert {r.slide_id: r.status for r in again} == {"s1": "skipped", "s2": "ok"}
    assert json.loads((out / "features_meta.json").read_text()) == meta
    with pytest.raises(ValueError, match="no weights"):
        F.build_extractor("hed_stats", random_weights=True)


def test_training_extractor_rebuilt_from_meta_gives_the_same_features(slide_factory, tmp_path, small_tile_params):
    """What `heatmap --slide` does for a new slide: the features equal those of the training extraction."""
    folder = tmp_path / "slides"
    slide_factory("s1", folder=folder, seed=1)
    slide_factory("s2", folder=folder, seed=2)
    train = tmp_path / "train"
    F.extract_slides(folder, train, _hed_params(small_tile_params, standardize=20, input_size=48), progress=False,
                     log=lambda *_: None)
    meta = json.loads((train / "features_meta.json").read_text())
    extractor = F.extractor_from_meta(meta, log=lambda *_: None)
    assert extractor.input_size == 48 and extractor.standardization == meta["standardization"]
    again = tmp_path / "again"
    F.extract_slides([folder / "s2.tif"], again, _hed_params(small_tile_params), progress=False,
                     log=lambda *_: None, extractor=extractor)
    torch.testing.assert_close(torch.load(again / "pt_files" / "s2.pt", weights_only=True),
                               torch.load(train / "pt_files" / "s2.pt", weights_only=True), rtol=0, atol=1e-6)
    # the extractor's own defaults would not have matched: another input size, no standardisation
    default = F.build_extractor("hed_stats")
    assert F.meta_differences(meta, default.meta(), ["input_size", "standardization"]) != []


def test_extractor_meta_refusals_name_the_field():
    meta = F.build_extractor("hed_stats", input_size=48).meta()
    assert F.requested_differences(meta, backbone="hed_stats", input_size=48) == []
    assert F.requested_differences(meta, input_size=224) == ["input_size: training 48 vs asked 224"]
    assert F.requested_differences(meta, backbone="resnet50_trunc")[0].startswith("backbone: training 'hed_stats'")
    assert F.requested_differences(meta, random_weights=True)[0].startswith("random_weights")
    calibrated = dict(F.build_extractor("timm:resnet18", random_weights=True, log=lambda *_: None).meta(),
                      batchnorm_calibration={"patches": 512, "slides": ["a", "b"]})
    with pytest.raises(ValueError, match="batchnorm_calibration: .* 512 patches of 2 training slide"):
        F.extractor_from_meta(calibrated)
    with pytest.raises(ValueError, match="weights: the training extractor's weights file '/nowhere/w.pth'"):
        F.extractor_from_meta(dict(meta, backbone="timm:resnet18", weights="/nowhere/w.pth"))
    assert F.meta_differences(meta, dict(meta, dim=47)) == ["dim: 46 vs 47"]
