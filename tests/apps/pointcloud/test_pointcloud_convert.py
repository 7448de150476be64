"""convert.py and upstream key / output parity of the PCM models.

Upstream parity: where the SkyworkAI/PointCloudMamba mirror is on this machine, its PCM.py, PCM_utils.py,
PointMLP_layers.py, mamba_layer.py and serialization.py (+ hilbert.py, z_order.py) are imported unchanged,
with stub modules for their third-party imports (mamba_ssm's Mamba / RMSNorm / rms_norm_fn written here from
the vendored code's definitions, addict, openpoints' registry, FPS from our ops). Upstream's model is then
built and compared with ours: state_dict keys and shapes, and float64 outputs after loading its weights.
Without the mirror those tests skip, and the key layout is checked against UPSTREAM_KEYS, produced by the
same harness.
"""

import importlib
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.apps.pointcloud.convert import load_pcm, load_upstream_checkpoint
from mambakit.apps.pointcloud.models import PointCloudMamba, PointMambaEncoder, create_model
from mambakit.apps.pointcloud.heads import PointMambaPartDecoder

MIRROR = Path("/work/.mirror/SkyworkAI+PointCloudMamba/repo")
UPSTREAM_FILES = ("PCM.py", "PCM_utils.py", "PointMLP_layers.py", "mamba_layer.py", "serialization.py",
                  "hilbert.py", "z_order.py")


class StubMamba(nn.Module):
    """Upstream's vendored Mamba with bimamba_type="v2": its parameter names and shapes, and the fast path's
    maths (forward scan + scan of the flipped sequence flipped back, summed, then out_proj), as a float64-capable
    loop."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, layer_idx=None, bimamba_type="none", **_):
        super().__init__()
        assert bimamba_type == "v2"
        self.d_inner, self.d_state, self.dt_rank = int(expand * d_model), d_state, math.ceil(d_model / 16)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        for s in ("", "_b"):
            setattr(self, f"conv1d{s}", nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj{s}", nn.Linear(di, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{s}", nn.Linear(self.dt_rank, di, bias=True))
            setattr(self, f"A{s}_log", nn.Parameter(torch.log(torch.arange(1, d_state + 1.0).repeat(di, 1))))
            setattr(self, f"D{s}", nn.Parameter(torch.ones(di)))
        self.out_proj = nn.Linear(di, d_model, bias=False)

    def _scan(self, xz, s):
        L = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        conv = getattr(self, f"conv1d{s}")
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.padding[0], groups=conv.groups)[..., :L])
        dbl = getattr(self, f"x_proj{s}")(x.transpose(1, 2))                     # (b, L, r + 2N)
        dt, B, C = dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(getattr(self, f"dt_proj{s}")(dt)).transpose(1, 2)       # (b, di, L), bias inside
        A = -torch.exp(getattr(self, f"A{s}_log").to(x.dtype))
        h = x.new_zeros(x.shape[0], self.d_inner, self.d_state)
        ys = []
        for t in range(L):
            h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, t, :] * x[:, :, t, None]
            ys.append((h * C[:, None, t, :]).sum(-1))
        y = torch.stack(ys, dim=-1) + x * getattr(self, f"D{s}").to(x.dtype)[:, None]
        return y * F.silu(z)

    def forward(self, hidden_states, inference_params=None):
        xz = self.in_proj(hidden_states).transpose(1, 2)
        y = self._scan(xz, "") + self._scan(xz.flip(-1), "_b").flip(-1)
        return self.out_proj(y.transpose(1, 2))


class StubRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, **_):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def stub_rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6, **_):
    """mamba_ssm's fused add + RMSNorm: residual = x (+ residual); returns (norm(residual), residual)."""
    residual = x if residual is None else x + residual
    out = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps) * weight
    return (out, residual) if prenorm else out


class _AttrDict(dict):
    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e

    def __setattr__(self, k, v):
        self[k] = v


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []
    sys.modules[name] = mod
    return mod


def import_upstream_pcm(workdir: Path):
    """Write upstream's PCM files under workdir/openpoints/models/PCM, stub their third-party imports and
    import the package; returns upstream's PCM module."""
    from mambakit.apps.pointcloud.ops import farthest_point_sample

    pkg = workdir / "pcm_upstream_pkg" / "openpoints" / "models" / "PCM"
    pkg.mkdir(parents=True, exist_ok=True)
    for f in UPSTREAM_FILES:
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:openpoints/models/PCM/{f}"],
                              check=True, capture_output=True, text=True).stdout
        (pkg / f).write_text(text)
    (pkg / "__init__.py").write_text("")

    class _Registry:
        def register_module(self, *a, **k):
            return lambda cls: cls

    _module("addict", Dict=_AttrDict)
    _module("mamba_ssm")
    _module("mamba_ssm.modules")
    _module("mamba_ssm.modules.mamba_simple", Mamba=StubMamba)
    _module("mamba_ssm.ops")
    _module("mamba_ssm.ops.triton")
    _module("mamba_ssm.ops.triton.layernorm", RMSNorm=StubRMSNorm, rms_norm_fn=stub_rms_norm_fn,
            layer_norm_fn=None)
    openpoints = _module("openpoints")
    openpoints.__path__ = [str(pkg.parent.parent)]
    models = _module("openpoints.models")
    models.__path__ = [str(pkg.parent)]
    _module("openpoints.models.build", MODELS=_Registry())
    _module("openpoints.models.layers", furthest_point_sample=farthest_point_sample)
    for k in [k for k in sys.modules if k.startswith("openpoints.models.PCM")]:
        del sys.modules[k]
    return importlib.import_module("openpoints.models.PCM.PCM")


needs_mirror = pytest.mark.skipif(not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists(),
                                  reason="the SkyworkAI/PointCloudMamba mirror is not on this machine")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    try:
        yield import_upstream_pcm(tmp_path_factory.mktemp("pcm_upstream"))
    finally:                      # drop the stubs, so nothing else imports them by accident
        for k in [k for k in sys.modules if k.split(".")[0] in ("openpoints", "mamba_ssm", "addict")]:
            del sys.modules[k]


TINY = dict(in_channels=3, embed_dim=8, dim_expansion=[1, 2, 1], pre_blocks=[1, 1, 2], pos_blocks=[0, 0, 0],
            k_neighbors=[4, 4, 4], reducers=[1, 2, 2], mamba_blocks=[1, 2, 2])
TINY_ORDERS = ["xyz", "hilbert", "z-trans", "z-trans", "zyx"]


def _upstream_encoder(up, orders=TINY_ORDERS, drop_path=0.1, **over):
    cfg = dict(TINY, **over)
    return up.PointMambaEncoder(**cfg, groups=1, res_expansion=1.0, activation="relu", bias=False, use_xyz=True,
                                normalize="anchor", rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                bimamba_type="v2", drop_path_rate=drop_path, mamba_pos=True,
                                mamba_layers_orders=list(orders), use_order_prompt=True, prompt_num_per_order=2)


def _randomise(state: dict) -> dict:
    """Every float entry moved off its init (BN running variances kept positive), so no parameter is inert."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = v + torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = v + 0.2 * torch.randn(v.shape, generator=g)
    return out


def _prompt_layout(upm, orders) -> list[str]:
    """The order of each prompt block in upstream's table (its set() iteration order in this process)."""
    starts = {upm.per_layer_prompt_indexe[i][0]: o for i, o in enumerate(orders)}
    return [starts[s] for s in sorted(starts)]


def _distinct_cells_cloud(b: int, n: int) -> torch.Tensor:
    """Random points whose grid cells (0.02) differ on every axis: upstream's as-written CTS orders by one axis
    only, and its argsort leaves ties unspecified (ours keeps input order), so ties would make orders differ."""
    g = torch.Generator().manual_seed(2)
    cells = torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(3)], -1) for _ in range(b)])
    return (cells.double() + 0.3 + 0.4 * torch.rand(b, n, 3, generator=g, dtype=torch.float64)) * 0.02


@needs_mirror
def test_encoder_keys_and_shapes_match_upstream(upstream):
    upm = _upstream_encoder(upstream)
    ours = PointMambaEncoder(**TINY, orders=TINY_ORDERS, prompt_num_per_order=2)
    theirs = {k: tuple(v.shape) for k, v in upm.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


@needs_mirror
@pytest.mark.parametrize("train", [False, True])
def test_encoder_outputs_match_upstream_float64(upstream, train):
    torch.manual_seed(0)
    upm = _upstream_encoder(upstream, drop_path=0.0)
    ours = PointMambaEncoder(**TINY, orders=TINY_ORDERS, prompt_num_per_order=2, cts="as_written", drop_path=0.0)
    state = _randomise(upm.state_dict())
    upm.load_state_dict(state)
    load_pcm(ours, {"model": state}, prompt_orders=_prompt_layout(upm, TINY_ORDERS))
    upm.double().train(train)
    ours.double().train(train)
    pos = _distinct_cells_cloud(3, 32)
    with torch.no_grad():
        p_up, x_up = upm.forward_seg_feat(pos, pos.transpose(1, 2).contiguous())
        p_our, x_our = ours.forward_levels(pos, pos)
        pooled_up = upm.forward_cls_feat(pos, pos.transpose(1, 2).contiguous())
        pooled_our = ours(pos, pos)
    for a, b in zip(p_up, p_our):
        torch.testing.assert_close(b, a, rtol=0, atol=0)             # same serialized order, same points
    for a, b in zip(x_up, x_our):
        torch.testing.assert_close(b, a.transpose(1, 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pooled_our, pooled_up, rtol=1e-10, atol=1e-12)


@needs_mirror
def test_part_decoder_keys_and_outputs_match_upstream(upstream):
    torch.manual_seed(0)
    upm = _upstream_encoder(upstream)
    dims = [8, 8, 16, 16]
    up_dec = upstream.PointMambaPartDecoder(encoder_channel_list=list(dims), decoder_channel_list=[16, 8, 8],
                                            decoder_blocks=[1, 1, 1], mamba_blocks=[0, 0, 0], mamba_layers_orders=[])
    ours = PointMambaPartDecoder(dims, n_categories=16, decoder_blocks=[1, 1, 1])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in up_dec.state_dict().items()}
    state = _randomise(up_dec.state_dict())
    up_dec.load_state_dict(state)
    ours.load_state_dict(state)
    up_dec.double().eval()
    ours.double().eval()
    upm.double().eval()
    upm.load_state_dict(_randomise(upm.state_dict()))
    pos = _distinct_cells_cloud(2, 32)
    category = torch.tensor([3, 15])
    with torch.no_grad():
        p_list, x_list = upm.forward_seg_feat(pos, pos.transpose(1, 2).contiguous())
        ours_out = ours(list(p_list), [x.transpose(1, 2) for x in x_list], category)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)        # upstream builds its one-hot with torch.zeros (default dtype)
        try:
            up_out = up_dec(list(p_list), list(x_list), category[:, None])
        finally:
            torch.set_default_dtype(default)
    torch.testing.assert_close(ours_out, up_out, rtol=1e-10, atol=1e-12)


def _upstream_keys() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in UPSTREAM_KEYS.strip().splitlines():
        key, shape = line.split()
        out[key] = tuple(int(s) for s in shape.split("x"))
    return out


def test_key_layout_matches_the_recorded_upstream_fixture():
    """Keys and shapes (BN counters aside) of upstream's encoder + part decoder for a minimal config, as the
    harness above printed them; our modules must produce the same."""
    enc = PointMambaEncoder(in_channels=3, embed_dim=8, dim_expansion=[1, 2], pre_blocks=[1, 1], pos_blocks=[0, 0],
                            k_neighbors=[4, 4], reducers=[1, 2], mamba_blocks=[1, 1], orders=["xyz", "z"],
                            prompt_num_per_order=2)
    dec = PointMambaPartDecoder(enc.channels, n_categories=16, decoder_blocks=[1, 1])
    mine = {f"{prefix}.{k}": tuple(v.shape) for prefix, m in (("encoder", enc), ("decoder", dec))
            for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert mine == _upstream_keys()


# -- convert.py ------------------------------------------------------------------------------------------------
def _tiny_cls(seed: int, **kw) -> PointCloudMamba:
    torch.manual_seed(seed)
    return create_model("pcm", 5, embed_dim=8, dim_expansion=(1, 2), pre_blocks=(1, 1), pos_blocks=(0, 0),
                        k_neighbors=(4, 4), reducers=(1, 2), mamba_blocks=(1, 1), orders=("xyz", "hilbert"),
                        prompt_num_per_order=2, cls_mlps=(16,), **kw)


def _upstream_layout(model: nn.Module) -> dict:
    """Our weights as upstream's training script saves them: DDP's module. prefix, under "model"."""
    return {"model": {"module." + k: v.clone() for k, v in _randomise(model.state_dict()).items()},
            "epoch": 250, "best_val": 93.1}


def test_round_trip_from_upstream_layout_gives_identical_outputs(tmp_path):
    source = _tiny_cls(0)
    ckpt = _upstream_layout(source)
    source.load_state_dict({k[len("module."):]: v for k, v in ckpt["model"].items()})
    path = tmp_path / "pcm.pth"
    torch.save(ckpt, path)
    target = load_pcm(_tiny_cls(1), path)
    pos = torch.rand(2, 24, 3, generator=torch.Generator().manual_seed(3))
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(pos, pos), source(pos, pos), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["model", "net", "network", "state_dict", "base_model", None])
def test_wrapper_keys_and_module_prefix_are_unwrapped(wrapper):
    model = _tiny_cls(0)
    state = {"module.module." + k: v for k, v in model.state_dict().items()}
    ckpt = state if wrapper is None else {wrapper: state, "optimizer": {"lr": 1e-4}}
    out = load_upstream_checkpoint(ckpt)
    assert set(out) == set(model.state_dict())


def test_mismatch_reports_missing_unexpected_and_wrong_shapes():
    model = _tiny_cls(0)
    state = dict(model.state_dict())
    del state["encoder.embedding.net.0.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["prediction.head.2.0.weight"] = torch.zeros(40, 16)   # a 40-class head into a 5-class model
    with pytest.raises(RuntimeError) as err:
        load_pcm(_tiny_cls(1), {"model": state})
    msg = str(err.value)
    assert "1 missing: encoder.embedding.net.0.weight" in msg
    assert "1 unexpected: encoder.extra.weight" in msg
    assert "prediction.head.2.0.weight: checkpoint (40, 16), model (5, 16)" in msg


def test_prompt_blocks_move_to_our_layout():
    model = _tiny_cls(0)                                      # our blocks: xyz rows 0-1, hilbert rows 2-3
    state = dict(model.state_dict())
    ours = state["encoder.order_prompt.weight"].clone()
    state["encoder.order_prompt.weight"] = torch.cat([ours[2:], ours[:2]])   # a checkpoint with hilbert first
    target = load_pcm(_tiny_cls(1), {"model": state}, prompt_orders=["hilbert", "xyz"])
    torch.testing.assert_close(target.encoder.order_prompt.weight.detach(), ours)
    with pytest.raises(ValueError, match="must name each of the model's orders"):
        load_pcm(_tiny_cls(1), {"model": state}, prompt_orders=["hilbert", "z"])


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_upstream_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_upstream_checkpoint({"epoch": 3, "config": {"lr": 1}})
    with pytest.raises(TypeError, match="checkpoint path or a dict"):
        load_upstream_checkpoint(42)


UPSTREAM_KEYS = """
decoder.cls_map.0.net.0.bias 64
decoder.cls_map.0.net.0.weight 64x16x1
decoder.cls_map.0.net.1.bias 64
decoder.cls_map.0.net.1.running_mean 64
decoder.cls_map.0.net.1.running_var 64
decoder.cls_map.0.net.1.weight 64
decoder.cls_map.1.net.0.bias 64
decoder.cls_map.1.net.0.weight 64x64x1
decoder.cls_map.1.net.1.bias 64
decoder.cls_map.1.net.1.running_mean 64
decoder.cls_map.1.net.1.running_var 64
decoder.cls_map.1.net.1.weight 64
decoder.decode_list.0.extraction.operation.0.net1.0.bias 8
decoder.decode_list.0.extraction.operation.0.net1.0.weight 8x8x1
decoder.decode_list.0.extraction.operation.0.net1.1.bias 8
decoder.decode_list.0.extraction.operation.0.net1.1.running_mean 8
decoder.decode_list.0.extraction.operation.0.net1.1.running_var 8
decoder.decode_list.0.extraction.operation.0.net1.1.weight 8
decoder.decode_list.0.extraction.operation.0.net2.0.bias 8
decoder.decode_list.0.extraction.operation.0.net2.0.weight 8x8x1
decoder.decode_list.0.extraction.operation.0.net2.1.bias 8
decoder.decode_list.0.extraction.operation.0.net2.1.running_mean 8
decoder.decode_list.0.extraction.operation.0.net2.1.running_var 8
decoder.decode_list.0.extraction.operation.0.net2.1.weight 8
decoder.decode_list.0.fuse.net.0.bias 8
decoder.decode_list.0.fuse.net.0.weight 8x24x1
decoder.decode_list.0.fuse.net.1.bias 8
decoder.decode_list.0.fuse.net.1.running_mean 8
decoder.decode_list.0.fuse.net.1.running_var 8
decoder.decode_list.0.fuse.net.1.weight 8
decoder.decode_list.1.extraction.operation.0.net1.0.bias 8
decoder.decode_list.1.extraction.operation.0.net1.0.weight 8x8x1
decoder.decode_list.1.extraction.operation.0.net1.1.bias 8
decoder.decode_list.1.extraction.operation.0.net1.1.running_mean 8
decoder.decode_list.1.extraction.operation.0.net1.1.running_var 8
decoder.decode_list.1.extraction.operation.0.net1.1.weight 8
decoder.decode_list.1.extraction.operation.0.net2.0.bias 8
decoder.decode_list.1.extraction.operation.0.net2.0.weight 8x8x1
decoder.decode_list.1.extraction.operation.0.net2.1.bias 8
decoder.decode_list.1.extraction.operation.0.net2.1.running_mean 8
decoder.decode_list.1.extraction.operation.0.net2.1.running_var 8
decoder.decode_list.1.extraction.operation.0.net2.1.weight 8
decoder.decode_list.1.fuse.net.0.bias 8
decoder.decode_list.1.fuse.net.0.weight 8x16x1
decoder.decode_list.1.fuse.net.1.bias 8
decoder.decode_list.1.fuse.net.1.running_mean 8
decoder.decode_list.1.fuse.net.1.running_var 8
decoder.decode_list.1.fuse.net.1.weight 8
decoder.gmp_map_end.net.0.bias 64
decoder.gmp_map_end.net.0.weight 64x192x1
decoder.gmp_map_end.net.1.bias 64
decoder.gmp_map_end.net.1.running_mean 64
decoder.gmp_map_end.net.1.running_var 64
decoder.gmp_map_end.net.1.weight 64
decoder.gmp_map_list.0.net.0.bias 64
decoder.gmp_map_list.0.net.0.weight 64x16x1
decoder.gmp_map_list.0.net.1.bias 64
decoder.gmp_map_list.0.net.1.running_mean 64
decoder.gmp_map_list.0.net.1.running_var 64
decoder.gmp_map_list.0.net.1.weight 64
decoder.gmp_map_list.1.net.0.bias 64
decoder.gmp_map_list.1.net.0.weight 64x8x1
decoder.gmp_map_list.1.net.1.bias 64
decoder.gmp_map_list.1.net.1.running_mean 64
decoder.gmp_map_list.1.net.1.running_var 64
decoder.gmp_map_list.1.net.1.weight 64
decoder.gmp_map_list.2.net.0.bias 64
decoder.gmp_map_list.2.net.0.weight 64x8x1
decoder.gmp_map_list.2.net.1.bias 64
decoder.gmp_map_list.2.net.1.running_mean 64
decoder.gmp_map_list.2.net.1.running_var 64
decoder.gmp_map_list.2.net.1.weight 64
encoder.embedding.net.0.weight 8x3x1
encoder.embedding.net.1.bias 8
encoder.embedding.net.1.running_mean 8
encoder.embedding.net.1.running_var 8
encoder.embedding.net.1.weight 8
encoder.local_grouper_list.0.affine_alpha 1x1x1x11
encoder.local_grouper_list.0.affine_beta 1x1x1x11
encoder.local_grouper_list.1.affine_alpha 1x1x1x11
encoder.local_grouper_list.1.affine_beta 1x1x1x11
encoder.mamba_blocks_list.0.0.mixer.A_b_log 16x16
encoder.mamba_blocks_list.0.0.mixer.A_log 16x16
encoder.mamba_blocks_list.0.0.mixer.D 16
encoder.mamba_blocks_list.0.0.mixer.D_b 16
encoder.mamba_blocks_list.0.0.mixer.conv1d.bias 16
encoder.mamba_blocks_list.0.0.mixer.conv1d.weight 16x1x4
encoder.mamba_blocks_list.0.0.mixer.conv1d_b.bias 16
encoder.mamba_blocks_list.0.0.mixer.conv1d_b.weight 16x1x4
encoder.mamba_blocks_list.0.0.mixer.dt_proj.bias 16
encoder.mamba_blocks_list.0.0.mixer.dt_proj.weight 16x1
encoder.mamba_blocks_list.0.0.mixer.dt_proj_b.bias 16
encoder.mamba_blocks_list.0.0.mixer.dt_proj_b.weight 16x1
encoder.mamba_blocks_list.0.0.mixer.in_proj.weight 32x8
encoder.mamba_blocks_list.0.0.mixer.out_proj.weight 8x16
encoder.mamba_blocks_list.0.0.mixer.x_proj.weight 33x16
encoder.mamba_blocks_list.0.0.mixer.x_proj_b.weight 33x16
encoder.mamba_blocks_list.0.0.norm.weight 8
encoder.mamba_blocks_list.1.0.mixer.A_b_log 32x16
encoder.mamba_blocks_list.1.0.mixer.A_log 32x16
encoder.mamba_blocks_list.1.0.mixer.D 32
encoder.mamba_blocks_list.1.0.mixer.D_b 32
encoder.mamba_blocks_list.1.0.mixer.conv1d.bias 32
encoder.mamba_blocks_list.1.0.mixer.conv1d.weight 32x1x4
encoder.mamba_blocks_list.1.0.mixer.conv1d_b.bias 32
encoder.mamba_blocks_list.1.0.mixer.conv1d_b.weight 32x1x4
encoder.mamba_blocks_list.1.0.mixer.dt_proj.bias 32
encoder.mamba_blocks_list.1.0.mixer.dt_proj.weight 32x1
encoder.mamba_blocks_list.1.0.mixer.dt_proj_b.bias 32
encoder.mamba_blocks_list.1.0.mixer.dt_proj_b.weight 32x1
encoder.mamba_blocks_list.1.0.mixer.in_proj.weight 64x16
encoder.mamba_blocks_list.1.0.mixer.out_proj.weight 16x32
encoder.mamba_blocks_list.1.0.mixer.x_proj.weight 33x32
encoder.mamba_blocks_list.1.0.mixer.x_proj_b.weight 33x32
encoder.mamba_blocks_list.1.0.norm.weight 16
encoder.order_prompt.weight 4x384
encoder.order_prompt_proj.0.weight 8x384
encoder.order_prompt_proj.1.weight 16x384
encoder.pos_proj.0.weight 8x3
encoder.pos_proj.1.weight 16x3
encoder.pre_blocks_list.0.operation.0.net1.0.weight 8x8x1
encoder.pre_blocks_list.0.operation.0.net1.1.bias 8
encoder.pre_blocks_list.0.operation.0.net1.1.running_mean 8
encoder.pre_blocks_list.0.operation.0.net1.1.running_var 8
encoder.pre_blocks_list.0.operation.0.net1.1.weight 8
encoder.pre_blocks_list.0.operation.0.net2.0.weight 8x8x1
encoder.pre_blocks_list.0.operation.0.net2.1.bias 8
encoder.pre_blocks_list.0.operation.0.net2.1.running_mean 8
encoder.pre_blocks_list.0.operation.0.net2.1.running_var 8
encoder.pre_blocks_list.0.operation.0.net2.1.weight 8
encoder.pre_blocks_list.0.transfer.net.0.weight 8x19x1
encoder.pre_blocks_list.0.transfer.net.1.bias 8
encoder.pre_blocks_list.0.transfer.net.1.running_mean 8
encoder.pre_blocks_list.0.transfer.net.1.running_var 8
encoder.pre_blocks_list.0.transfer.net.1.weight 8
encoder.pre_blocks_list.1.operation.0.net1.0.weight 16x16x1
encoder.pre_blocks_list.1.operation.0.net1.1.bias 16
encoder.pre_blocks_list.1.operation.0.net1.1.running_mean 16
encoder.pre_blocks_list.1.operation.0.net1.1.running_var 16
encoder.pre_blocks_list.1.operation.0.net1.1.weight 16
encoder.pre_blocks_list.1.operation.0.net2.0.weight 16x16x1
encoder.pre_blocks_list.1.operation.0.net2.1.bias 16
encoder.pre_blocks_list.1.operation.0.net2.1.running_mean 16
encoder.pre_blocks_list.1.operation.0.net2.1.running_var 16
encoder.pre_blocks_list.1.operation.0.net2.1.weight 16
encoder.pre_blocks_list.1.transfer.net.0.weight 16x19x1
encoder.pre_blocks_list.1.transfer.net.1.bias 16
encoder.pre_blocks_list.1.transfer.net.1.running_mean 16
encoder.pre_blocks_list.1.transfer.net.1.running_var 16
encoder.pre_blocks_list.1.transfer.net.1.weight 16
encoder.residual_proj_blocks_list.1.weight 16x8
"""
