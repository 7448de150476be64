"""The weights registry: download + verify + load_pretrained on a tiny model served from 127.0.0.1."""

import argparse
import hashlib
import io
import textwrap

import pytest
import torch
from torch import nn

from mambakit.apps import register_app, unregister_app
from mambakit.data import ChecksumError, DownloadError, OfflineError, UnknownEntryError, UnverifiedDownloadWarning
from mambakit.data import download as download_module
from mambakit.data.testing import FileServer
from mambakit.engine.app import App
from mambakit.engine.checkpoint import load_checkpoint
from mambakit.zoo import (WeightEntry, download_weights, get_weights, list_weights, load_pretrained, register_weights,
                          resolve_weights, save_pretrained, weights_path)

CONFIG = {"in_features": 4, "out_features": 3}


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


STATE = _state()
PLAIN = _bytes(STATE)
UPSTREAM = _bytes({"net": {"w": STATE["weight"], "b": STATE["bias"]}, "epoch": 7})
PICKLED = _bytes({"model": STATE, "args": argparse.Namespace(lr=0.1)})
sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731


@pytest.fixture(autouse=True)
def _isolation(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    monkeypatch.setattr(download_module, "RETRY_WAIT_S", 0.0)
    from mambakit.zoo import registry
    monkeypatch.setattr(registry, "_WEIGHTS", {})
    # A converter module importable by "module:function", as an app's convert.py would be.
    (tmp_path / "toy_convert.py").write_text(textwrap.dedent("""
        def from_upstream(obj):
            return {"weight": obj["net"]["w"], "bias": obj["net"]["b"]}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def server():
    with FileServer({"tiny.pt": PLAIN, "upstream.pth": UPSTREAM, "pickled.pth": PICKLED}) as s:
        yield s


def _entry(server, name="tiny-linear", files=("tiny.pt",), digest=None, **kwargs) -> WeightEntry:
    kwargs.setdefault("filename", "tiny.pt")
    return register_weights(WeightEntry(
        name=name, app="testapp", description="a 4 -> 3 linear layer", builder="torch.nn:Linear", config=CONFIG,
        urls=[server.url(f) for f in files], sha256=digest or sha(PLAIN), licence="MIT",
        metrics={"toy/acc": 1.0}, **kwargs))


def _assert_loaded(model):
    assert isinstance(model, nn.Linear) and not model.training
    torch.testing.assert_close(model.weight, STATE["weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.bias, STATE["bias"], rtol=0, atol=0)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model.double()(x), x @ STATE["weight"].double().T + STATE["bias"].double())


def test_download_verify_and_load(server):
    entry = _entry(server)
    path = download_weights("tiny-linear")
    assert path == weights_path(entry) and path.read_bytes() == PLAIN
    _assert_loaded(load_pretrained("tiny-linear"))
    assert len(server.requests) == 1                          # loading reused the cache


def test_second_url_is_used_when_the_first_fails(server):
    _entry(server, files=("gone.pt", "tiny.pt"))
    _assert_loaded(load_pretrained("tiny-linear"))
    assert [p for p, _ in server.requests] == ["/gone.pt", "/tiny.pt"]


def test_checksum_mismatch_is_refused(server):
    _entry(server, digest="f" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch") as info:
        download_weights("tiny-linear")
    assert "f" * 64 in str(info.value) and sha(PLAIN) in str(info.value)
    assert not weights_path(get_weights("tiny-linear")).exists()
    _entry(server, name="two-urls", files=("tiny.pt", "tiny.pt"), digest="e" * 64)
    with pytest.raises(ChecksumError, match="every URL failed"):
        download_weights("two-urls")


def test_builder_overrides_reach_the_builder_and_strict_loading(server):
    _entry(server)
    with pytest.raises(ValueError, match="do not fit torch.nn:Linear.*Unexpected key\\(s\\).*bias"):
        load_pretrained("tiny-linear", bias=False)


def test_converter_maps_an_upstream_layout(server):
    _entry(server, files=("upstream.pth",), digest=sha(UPSTREAM), filename="upstream.pth",
           converter="toy_convert:from_upstream")
    _assert_loaded(load_pretrained("tiny-linear"))


def test_pickled_upstream_file_needs_a_reason(server):
    _entry(server, files=("pickled.pth",), digest=sha(PICKLED), filename="pickled.pth")
    with pytest.raises(ValueError, match="pickles Python objects beyond tensors"):
        load_pretrained("tiny-linear")
    _entry(server, name="tiny-pickled", files=("pickled.pth",), digest=sha(PICKLED), filename="pickled.pth",
           pickle_reason="upstream stores its argparse.Namespace in the checkpoint")
    _assert_loaded(load_pretrained("tiny-pickled"))
    with pytest.raises(ValueError, match="needs a pinned sha256"):
        WeightEntry("x", "a", "", "torch.nn:Linear", {}, [], None, "x.pt", pickle_reason="why")


def test_offline_mode(server, monkeypatch):
    _entry(server)
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        load_pretrained("tiny-linear")
    message = str(info.value)
    assert "MAMBAKIT_OFFLINE=1" in message and "mambakit zoo download tiny-linear" in message
    assert str(weights_path(get_weights("tiny-linear"))) in message
    assert server.requests == []
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "0")
    download_weights("tiny-linear")
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    _assert_loaded(load_pretrained("tiny-linear"))


def test_save_pretrained_round_trip(tmp_path):
    model = nn.Linear(4, 3)
    model.load_state_dict(STATE)
    path = save_pretrained(model, tmp_path / "out" / "model.pt", builder="torch.nn:Linear", config=CONFIG,
                           metric=0.5)
    _assert_loaded(load_pretrained(path))
    _assert_loaded(load_pretrained(str(path)))
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_bare_state_dict_needs_a_builder(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({f"module.{k}": v for k, v in STATE.items()}, path)   # as saved from a DDP-wrapped model
    with pytest.raises(ValueError, match="does not say how to build its model; pass builder="):
        load_pretrained(path)
    _assert_loaded(load_pretrained(path, builder="torch.nn:Linear", **CONFIG))


def test_training_checkpoint_with_builder_and_sidecar(tmp_path):
    path = tmp_path / "step-00000010.pt"
    torch.save({"format": "mambakit-checkpoint-v1", "model": STATE, "step": 10,
                "builder": "torch.nn:Linear", "builder_config": CONFIG}, path)
    (tmp_path / "step-00000010.pt.sha256").write_text(f"{sha(path.read_bytes())}  step-00000010.pt\n")
    _assert_loaded(load_pretrained(path))
    path.write_bytes(path.read_bytes()[:-10])                         # truncated: refused before unpickling
    with pytest.raises(ValueError, match="is corrupt or truncated"):
        load_pretrained(path)


def test_training_checkpoint_without_sidecar_is_refused_as_the_engine_refuses_it(tmp_path):
    path = tmp_path / "step-00000010.pt"
    torch.save({"format": "mambakit-checkpoint-v1", "model": STATE, "step": 10,
                "builder": "torch.nn:Linear", "builder_config": CONFIG}, path)
    with pytest.raises(ValueError, match="has no checksum file step-00000010.pt.sha256.*sha256sum"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="has no checksum file"):
        load_checkpoint(path)
    bare = tmp_path / "weights.pt"                                     # any other file needs no sidecar
    torch.save(STATE, bare)
    _assert_loaded(load_pretrained(bare, builder="torch.nn:Linear", **CONFIG))


def test_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file(STATE, str(path))
    _assert_loaded(load_pretrained(path, builder="torch.nn:Linear", **CONFIG))


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(PLAIN[: len(PLAIN) // 2])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_pretrained(path, builder="torch.nn:Linear", **CONFIG)


def test_unknown_names(server, tmp_path):
    _entry(server)
    with pytest.raises(UnknownEntryError, match="neither an existing file nor registered.*did you mean 'tiny-linear'"):
        resolve_weights("tiny-linaer")
    with pytest.raises(FileNotFoundError):
        resolve_weights(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        load_pretrained("tiny-linear", builder="no_such_module:f")


def test_entry_validation():
    with pytest.raises(ValueError, match="builder must be 'module:function'"):
        WeightEntry("x", "a", "", "torch.nn.Linear", {}, [], None, "x.pt")
    with pytest.raises(ValueError, match="name must match"):
        WeightEntry("a/b", "a", "", "torch.nn:Linear", {}, [], None, "x.pt")


def test_weights_of_discovered_apps_are_listed(server):
    entry = WeightEntry("app-weights", "zooapp", "", "torch.nn:Linear", CONFIG, [server.url("tiny.pt")],
                        sha(PLAIN), "tiny.pt")
    register_app(App(name="zooapp", description="an app with weights", weights=[entry]))
    try:
        assert entry in list_weights()
        _assert_loaded(load_pretrained("app-weights"))
    finally:
        unregister_app("zooapp")


def _closed_port_url(name: str) -> str:
    """A URL on loopback where nothing listens: the connection is refused at once, no real host is asked."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_unreachable_weights_say_what_to_download_where_to_put_it_and_that_it_is_checked(tmp_path):
    url = _closed_port_url("tiny.pt")
    entry = register_weights(WeightEntry("tiny-far", "testapp", "", "torch.nn:Linear", CONFIG, [url], sha(PLAIN),
                                         "tiny.pt"))
    with pytest.raises(DownloadError) as info:
        load_pretrained("tiny-far")
    message = str(info.value)
    assert f"could not reach {url}" in message                                  # why
    assert f"download {url} on a machine that can reach it" in message          # what
    assert str(weights_path(entry)) in message                                  # where, exactly
    assert "`mambakit zoo download tiny-far --from FILE`" in message
    assert f"checked against the pinned sha256 {sha(PLAIN)}" in message
    assert not isinstance(info.value, ChecksumError)
    # an entry without a pinned hash says so instead of promising a check
    register_weights(WeightEntry("tiny-far2", "testapp", "", "torch.nn:Linear", CONFIG, [url], None, "tiny.pt"))
    with pytest.raises(DownloadError, match="no sha256 is pinned for these weights, so it is accepted as is"):
        download_weights("tiny-far2")


def test_offline_message_names_the_url_the_path_and_from(server, monkeypatch):
    entry = _entry(server)
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        download_weights("tiny-linear")
    message = str(info.value)
    assert server.url("tiny.pt") in message and str(weights_path(entry)) in message
    assert "mambakit zoo download tiny-linear --from FILE" in message and sha(PLAIN) in message
    assert server.requests == []


def test_weights_from_a_local_file_are_checked_before_they_are_cached(tmp_path):
    entry = register_weights(WeightEntry("tiny-local", "testapp", "", "torch.nn:Linear", CONFIG,
                                         [_closed_port_url("tiny.pt")], sha(PLAIN), "tiny.pt"))
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(UPSTREAM)
    with pytest.raises(ChecksumError) as info:
        download_weights("tiny-local", local_path=wrong)
    assert f"its sha256 {sha(UPSTREAM)} is not the pinned {sha(PLAIN)}" in str(info.value)
    assert wrong.read_bytes() == UPSTREAM                                       # the user's file is left alone
    assert not weights_path(entry).exists() and list(weights_path(entry).parent.glob("*.part")) == []
    with pytest.raises(DownloadError, match="no such file"):
        download_weights("tiny-local", local_path=tmp_path / "nothing.pt")
    right = tmp_path / "dl"
    right.mkdir()
    (right / "tiny.pt").write_bytes(PLAIN)
    assert download_weights("tiny-local", local_path=right) == weights_path(entry)   # a folder holding it
    assert weights_path(entry).read_bytes() == PLAIN
    _assert_loaded(load_pretrained("tiny-local"))                               # no network needed now
    # unpinned: taken, with a warning that prints the hash to compare
    register_weights(WeightEntry("tiny-local2", "testapp", "", "torch.nn:Linear", CONFIG, [], None, "tiny.pt"))
    with pytest.warns(UnverifiedDownloadWarning, match=sha(PLAIN)):
        download_weights("tiny-local2", local_path=right / "tiny.pt")


def test_a_cached_file_that_differs_from_the_pinned_hash_is_fetched_again(server):
    entry = _entry(server)
    weights_path(entry).parent.mkdir(parents=True)
    weights_path(entry).write_bytes(b"put here by hand, but the wrong file")
    with pytest.warns(UserWarning, match="is not the pinned"):
        assert download_weights("tiny-linear").read_bytes() == PLAIN
    assert len(server.requests) == 1
