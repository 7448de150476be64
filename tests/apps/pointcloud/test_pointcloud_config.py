"""The point-cloud recipe schema: defaults, presets and their overrides, cross-section checks, and the errors
a wrong recipe gets (through the engine's loader, so the message names the file and key)."""

import subprocess
import sys

import pytest

from mambakit.apps.pointcloud.config import (AUGMENT_PRESETS, FEATURE_CHANNELS, MODEL_NAMES, POINT_ORDERS,
                                             AugmentConfig, AugmentSettings, PointCloudRecipe, in_channels_of)
from mambakit.engine.config import ConfigError, from_dict, load_config, save_config


def build(data: dict, source: str = "recipe.yaml") -> PointCloudRecipe:
    return from_dict(PointCloudRecipe, data, source)


def test_defaults_are_the_embedded_classification_set():
    recipe = build({})
    assert recipe.data.source == "cgal" and recipe.data.task == "cls" and recipe.model.task == "cls"
    assert recipe.data.n_points == 1024 and recipe.data.in_channels == 3
    assert recipe.augment.resolve() == AUGMENT_PRESETS["modelnet"]


def test_presets_hold_the_published_values():
    modelnet = AugmentConfig(preset="modelnet").resolve()
    assert modelnet.scale == pytest.approx((2 / 3, 3 / 2)) and modelnet.shift == 0.2 and modelnet.anisotropic
    assert modelnet.smoothing == 0.2 and modelnet.rotate_y == 0 and not modelnet.center_normalize
    scan = AugmentConfig(preset="scanobjectnn").resolve()
    assert scan.scale == (0.9, 1.1) and scan.rotate_y == 180 and scan.center_normalize
    assert scan.fps_presample == 1200 and scan.smoothing == 0.3 and scan.shift == 0
    none = AugmentConfig(preset="none").resolve()
    assert not none.scales and none.shift == none.rotate_y == none.jitter_sigma == none.smoothing == 0


def test_a_knob_overrides_its_preset_value_only():
    augment = build({"augment": {"preset": "scanobjectnn", "smoothing": 0.1, "scale": [0.8, 1.25]}}).augment
    resolved = augment.resolve()
    assert resolved.smoothing == 0.1 and resolved.scale == (0.8, 1.25)
    assert resolved.rotate_y == 180 and resolved.fps_presample == 1200        # still the preset's


def test_a_saved_recipe_loads_back_equal(tmp_path):
    recipe = build({"data": {"source": "shapenetpart", "root": "/data/snp", "features": "xyz_normals"},
                    "augment": {"preset": "shapenetpart", "jitter_sigma": 0.002}, "model": {"name": "pcm_tiny"}})
    assert recipe.model.task == "seg"                                         # from the data
    save_config(recipe, tmp_path / "config.yaml")
    again = load_config(PointCloudRecipe, tmp_path / "config.yaml")
    assert again == recipe
    assert again.augment.resolve().jitter_sigma == 0.002


@pytest.mark.parametrize("data, message", [
    ({"data": {"source": "scanobjectnn", "root": "x", "features": "xyz_normals"}},
     "features 'xyz_normals' needs normals, which source 'scanobjectnn' does not have"),
    ({"data": {"n_points": 0}}, "data: n_points must be >= 1, got 0"),
    ({"data": {"val_fraction": 1.0}}, r"val_fraction must lie in \[0, 1\), got 1.0"),
    ({"data": {"class_names": ["a", "b", "a"]}}, r"class_names lists \['a'\] more than once"),
    ({"data": {"source": "kitti", "root": "x"}}, "data.source: expected one of 'cgal', "),
    ({"data": {"features": "rgb"}}, "data.features: expected one of 'xyz', 'xyz_height', 'xyz_normals'"),
    ({"model": {"name": "pointnet"}}, "model.name: expected one of 'pcm', 'pcm_tiny'"),
    ({"augment": {"preset": "kitti"}}, "augment.preset: expected one of"),
    ({"augment": {"scale": [1.5, 1.0]}}, r"augment: scale must be \(low, high\) with 0 < low <= high"),
    ({"augment": {"rotate_y": 360}}, r"rotate_y is a maximum angle in degrees within \[0, 180\], got 360"),
    ({"augment": {"jitter_sigma": 0.01, "jitter_clip": 0}}, "jitter_clip must be > 0 when jitter_sigma is set"),
    ({"augment": {"smoothing": 1.0}}, r"smoothing must lie in \[0, 1\)"),
    ({"augment": {"shiftt": 0.1}}, "unknown key 'augment.shiftt' \\(did you mean 'shift'\\?\\)"),
    ({"eval": {"render_samples": -1}}, "render_samples must be >= 0"),
    ({"eval": {"render_orders": ["hilbrt"]}}, "unknown point order 'hilbrt' \\(did you mean 'hilbert'\\?\\)"),
    ({"data": {"source": "shapenetpart", "root": "x"}, "model": {"task": "cls"}},
     "model.task is 'cls' but data source 'shapenetpart' is a part-segmentation set; set model.task: seg"),
    ({"data": {"cgal_task": "seg"}, "model": {"task": "cls"}},
     r"data source 'cgal' \(cgal_task 'seg'\) is a part-segmentation set"),
    ({"data": {"n_points": 2048}, "augment": {"preset": "scanobjectnn"}},
     r"augment.fps_presample \(1200\) must be 0 or at least data.n_points \(2048\)"),
])
def test_bad_recipes_get_errors_naming_the_file_and_key(data, message):
    with pytest.raises(ConfigError, match=r"^recipe.yaml: ") as info:
        build(data)
    assert info.match(message)


def test_orders_and_models_agree_with_the_code_they_name():
    from mambakit.core.orders import PointOrder

    assert POINT_ORDERS == PointOrder.KINDS
    assert build({"eval": {"render_orders": ["z-trans", "ZYX"]}}).eval.render_orders == ["z-trans", "ZYX"]
    from mambakit.apps.pointcloud.models import model_names

    assert set(MODEL_NAMES) <= set(model_names())


def test_feature_channels():
    from mambakit.apps.pointcloud.data import FEATURES

    assert FEATURE_CHANNELS == FEATURES == {"xyz": 3, "xyz_height": 4, "xyz_normals": 6, "xyz_normals_height": 7}
    assert in_channels_of("xyz_height") == 4
    with pytest.raises(ValueError, match="unknown features 'rgb'; expected one of xyz, xyz_height, xyz_normals, xyz_normals_height"):
        in_channels_of("rgb")


def test_settings_validate_on_their_own():
    with pytest.raises(ValueError, match="fps_presample must be >= 0"):
        AugmentSettings(fps_presample=-1)


def test_config_module_does_not_import_torch():
    code = ("import sys; import mambakit.apps.pointcloud.config; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
