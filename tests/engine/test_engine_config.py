"""Typed configs: every error names the file (or override) and the dotted key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mambakit.engine.config import (ConfigError, apply_overrides, from_dict, load_config, parse_overrides,
                                    save_config, to_dict)
from mambakit.engine.schema import TrainConfig


@dataclass
class Adam:
    name: Literal["adam"] = "adam"
    lr: float = 1e-3


@dataclass
class Sgd:
    name: Literal["sgd"]
    lr: float = 0.1
    momentum: float = 0.9


@dataclass
class Data:
    path: Path
    columns: list[str] = field(default_factory=list)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    sizes: dict[str, int] = field(default_factory=dict)
    limit: int | None = None


@dataclass
class Model:
    kind: Literal["small", "large"] = "small"
    width: int = 8
    dropout: float = 0.0

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class Recipe:
    data: Data
    model: Model = field(default_factory=Model)
    optim: Adam | Sgd = field(default_factory=Adam)
    train: TrainConfig = field(default_factory=TrainConfig)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path, overrides)
    return str(info.value), str(path)


def test_valid_file_builds_the_typed_tree(tmp_path):
    path = write(tmp_path, "data: {path: a.csv, columns: [x, y], split: [0.6, 0.2, 0.2], sizes: {a: 1}}\n"
                           "model: {kind: large, width: 4}\noptim: {name: sgd, momentum: 0.5}\n"
                           "train: {epochs: 3, optimizer: {lr: 7e-5}}\n")
    recipe = load_config(Recipe, path)
    assert recipe.data.path == Path("a.csv") and recipe.data.columns == ["x", "y"]
    assert recipe.data.split == (0.6, 0.2, 0.2) and recipe.data.sizes == {"a": 1}
    assert recipe.model == Model("large", 4, 0.0)
    assert isinstance(recipe.optim, Sgd) and recipe.optim.momentum == 0.5 and recipe.optim.lr == 0.1
    assert recipe.train.epochs == 3
    assert recipe.train.optimizer.lr == pytest.approx(7e-5)   # YAML reads 7e-5 as a string


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\nmodel: {widht: 3}\n")
    assert message == f"{path}: unknown key 'model.widht' (did you mean 'width'?)"


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\nmodel: {zzz: 3}\n")
    assert message.startswith(f"{path}: unknown key 'model.zzz' (known keys: kind, width, dropout)")


def test_wrong_type(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\ntrain: {optimizer: {lr: fast}}\n")
    assert message == f"{path}: train.optimizer.lr: expected float, got 'fast' (str)"
    message, _ = error_of(tmp_path, "data: {path: a.csv}\ntrain: {epochs: 2.5}\n")
    assert message == f"{path}: train.epochs: expected int, got 2.5 (float)"
    message, _ = error_of(tmp_path, "data: {path: a.csv}\ntrain: {deterministic: 1}\n")
    assert "train.deterministic: expected bool, got 1 (int)" in message


def test_list_item_type_is_checked_with_its_index(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv, columns: [x, [1]]}\n")
    assert message == f"{path}: data.columns[1]: expected str, got [1] (list)"
    message, _ = error_of(tmp_path, "data: {path: a.csv, split: [0.5, 0.5]}\n")
    assert "data.split: expected a list of 3 items, got 2" in message


def test_missing_required(tmp_path):
    message, path = error_of(tmp_path, "model: {width: 3}\n")
    assert message == f"{path}: missing required key 'data'"
    message, _ = error_of(tmp_path, "data: {columns: [a]}\n")
    assert message == f"{path}: missing required key 'data.path'"


def test_literal(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\nmodel: {kind: medium}\n")
    assert message == f"{path}: model.kind: expected one of 'small', 'large', got 'medium' (str)"
    message, _ = error_of(tmp_path, "data: {path: a.csv}\ntrain: {precision: fp8}\n")
    assert "train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'" in message


def test_tagged_union_by_name(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\noptim: {name: rmsprop}\n")
    assert message == f"{path}: optim.name: unknown name 'rmsprop'; expected one of 'adam', 'sgd'"
    message, _ = error_of(tmp_path, "data: {path: a.csv}\noptim: {lr: 0.1}\n")
    assert message == f"{path}: optim.name: missing required key; expected one of 'adam', 'sgd'"
    # keys are checked against the member the name picked
    message, _ = error_of(tmp_path, "data: {path: a.csv}\noptim: {name: adam, momentum: 0.1}\n")
    assert message.startswith(f"{path}: unknown key 'optim.momentum'")


def test_post_init_error_is_wrapped_with_location(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\nmodel: {dropout: 1.5}\n")
    assert message == f"{path}: model: dropout must be in [0, 1), got 1.5"
    message, _ = error_of(tmp_path, "data: {path: a.csv}\ntrain: {batch_size: 0}\n")
    assert message == f"{path}: train: batch_size must be >= 1, got 0"


def test_overrides_set_create_and_parse_values(tmp_path):
    path = write(tmp_path, "data: {path: a.csv}\n")
    recipe = load_config(Recipe, path, ["train.optimizer.lr=3e-4", "model.width=32", "data.limit=null",
                                        "train.scheduler.name=cosine", "data.columns=[a, b]",
                                        "optim.name=sgd", "train.clip_grad_norm=1"])
    assert recipe.train.optimizer.lr == pytest.approx(3e-4)
    assert recipe.model.width == 32 and recipe.data.limit is None and recipe.data.columns == ["a", "b"]
    assert recipe.train.scheduler.name == "cosine" and isinstance(recipe.optim, Sgd)
    assert recipe.train.clip_grad_norm == 1.0 and isinstance(recipe.train.clip_grad_norm, float)


def test_overrides_create_nested_keys_without_touching_the_input():
    data = {"data": {"path": "a"}}
    out = apply_overrides(data, ["train.early_stopping.patience=3"])
    assert out["train"] == {"early_stopping": {"patience": 3}}
    assert data == {"data": {"path": "a"}}
    assert from_dict(Recipe, out).train.early_stopping.patience == 3


def test_override_unknown_key_names_the_key(tmp_path):
    message, path = error_of(tmp_path, "data: {path: a.csv}\n", ["train.optimzer.lr=1"])
    assert message == f"{path}: unknown key 'train.optimzer' (did you mean 'optimizer'?)"


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", ".lr=1", "lr."])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match=rf"override '{bad}': expected KEY.SUB=VALUE"):
        parse_overrides([bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'model.width.x=1': 'model.width' is not a mapping"):
        apply_overrides({"model": {"width": 3}}, ["model.width.x=1"])


def test_float_strings_and_ints():
    assert from_dict(TrainConfig, {"optimizer": {"lr": "7e-5"}}).optimizer.lr == pytest.approx(7e-5)
    assert from_dict(TrainConfig, {"optimizer": {"lr": 2}}).optimizer.lr == 2.0
    assert from_dict(TrainConfig, {"epochs": "1_000"}).epochs == 1000
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got 'nan' \(str\)"):
        from_dict(TrainConfig, {"optimizer": {"lr": "nan"}})


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Recipe, tmp_path / "nope.yaml")
    path = write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_config(Recipe, path)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"{path}: the top level must be a mapping of keys, got list"):
        load_config(Recipe, path)


def test_save_config_round_trip(tmp_path):
    recipe = load_config(Recipe, write(tmp_path, "data: {path: a.csv, split: [0.5, 0.25, 0.25]}\n"),
                         ["optim.name=sgd", "train.optimizer.betas=[0.8, 0.9]"])
    out = tmp_path / "resolved.yaml"
    save_config(recipe, out)
    again = load_config(Recipe, out)
    assert again == recipe
    assert to_dict(again)["data"]["path"] == "a.csv"
