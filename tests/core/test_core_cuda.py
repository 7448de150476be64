"""The core on a CUDA GPU: every mixer kind, the memory-efficient path, Mamba-2, a backbone, recurrent decoding,
variable lengths and bfloat16 autocast, in float32 on the GPU against the same modules in float64 on the CPU,
forward and backward (tests/cuda_parity.py). Skipped without CUDA."""

import pytest
import torch

from core_refs import randomize
from cuda_parity import assert_cuda_matches_cpu_float64, cuda_or_skip
from mambakit.core import InferenceParams, Mamba, Mamba2, MixerModel, MultiOrderMamba, PerOrderMamba
from mambakit.core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.gpu

MIXERS = {
    "mamba": lambda: Mamba(32, d_state=16),
    "mamba_memory_efficient": lambda: Mamba(32, d_state=16, memory_efficient=True),
    "mamba_dconv2_expand1": lambda: Mamba(32, d_state=2, d_conv=2, expand=1),       # S-Mamba's mixer
    "vim_bimamba_v2": lambda: MultiOrderMamba.vim(32, d_state=16),
    "vim_memory_efficient": lambda: MultiOrderMamba.vim(32, d_state=16, memory_efficient=True),
    "sr_mamba_padded": lambda: MultiOrderMamba.sr(32, rate=5, d_state=16),
    "concat_merge": lambda: MultiOrderMamba(32, orders=("identity", "flip", "stride_3"), merge="concat"),
    "per_order_sum": lambda: PerOrderMamba(32, orders=("identity", "flip"), merge="sum", d_state=8),
    "mamba2": lambda: Mamba2(64, d_state=32, headdim=16, chunk_size=16),
}


class FedEmbeddings(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(inputs_embeds=x)


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("length", [1, 77, 600])
def test_mixer_on_gpu_matches_float64_cpu(kind, length):
    torch.manual_seed(0)
    mixer = randomize(MIXERS[kind]())
    x = torch.randn(3, length, mixer.d_model if hasattr(mixer, "d_model") else 32)
    assert_cuda_matches_cpu_float64(mixer, (x,))


def test_backbone_with_drop_path_and_residual_in_fp32_on_gpu():
    torch.manual_seed(0)
    backbone = MixerModel(48, n_layer=3, ssm_cfg={"layer": "MultiOrder", "orders": ("identity", "flip")},
                          residual_in_fp32=True, drop_path_rate=0.1)
    assert_cuda_matches_cpu_float64(FedEmbeddings(backbone), (torch.randn(2, 130, 48),))


def test_language_model_on_gpu_matches_cpu_and_decodes_step_by_step():
    device = cuda_or_skip()
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=101, ssm_cfg={}, residual_in_fp32=True)
    lm = MambaLMHeadModel(cfg)
    ids = torch.randint(0, 101, (2, 40))
    ref = lm.double().eval()(ids).logits
    gpu = MambaLMHeadModel(cfg).to(device).eval()
    gpu.load_state_dict(lm.float().state_dict())
    ids_gpu = ids.to(device)
    with torch.no_grad():
        logits = gpu(ids_gpu).logits
        torch.testing.assert_close(logits.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
        # recurrent decoding on the GPU (the Triton state update) equals the full forward
        params = InferenceParams(max_seqlen=40, max_batch_size=2)
        steps = []
        for t in range(40):
            steps.append(gpu(ids_gpu[:, t:t + 1], inference_params=params).logits)
            params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-4, atol=1e-4)


def test_variable_lengths_on_gpu_match_each_sequence_alone():
    device = cuda_or_skip()
    torch.manual_seed(0)
    m = randomize(MultiOrderMamba.vim(32, d_state=16)).to(device)
    x = torch.randn(3, 50, 32, device=device)
    lengths = torch.tensor([50, 31, 7], device=device)
    with torch.no_grad():
        batched = m(x, lengths=lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = m(x[i:i + 1, :n])
            torch.testing.assert_close(batched[i:i + 1, :n], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "vim_bimamba_v2", "mamba2"])
def test_bfloat16_autocast_on_gpu_trains_close_to_float32(kind):
    device = cuda_or_skip()
    if device.type != "cuda":
        pytest.skip("autocast to bfloat16 is checked on CUDA only")
    torch.manual_seed(0)
    mixer = randomize(MIXERS[kind]()).to(device)
    x = torch.randn(4, 256, mixer.d_model, device=device, requires_grad=True)
    y32 = mixer(x)
    g32 = torch.autograd.grad(y32.square().mean(), x)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = mixer(x)
    g16 = torch.autograd.grad(y16.float().square().mean(), x)[0]
    assert y16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(y16, y32) < 3e-2 and rel(g16, g32) < 5e-2
