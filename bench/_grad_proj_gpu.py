"""GPU mode of bench/bench_grad_proj.py (``--device cuda [--quick]``), kept in its own module so the
CPU benchmark stays as it is.

Model: a Llama-3.2-1B-shaped model built from a config on the GPU with random weights (hidden
2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256: 1.24 B parameters),
bf16, sdpa attention. Rows, all timed with CUDA events in one run:

* plain fwd+bwd step (per-example mean CE summed, backward) -- the baseline;
* GradientProjector(kind="factored", rank 16x16) on every decoder linear layer, with and
  without weight gradients, as a multiple of the plain step (``x_plain``);
* factored_sketch alone at the MLP up-projection's shape (cxx, triton): FLOPs / time against
  the device's dense bf16 peak (bench/_gpu.py).

TARGET (not a result): factored projected gradients <= 1.1x a plain step on the 1B shape.
"""

from __future__ import annotations

import torch
from _gpu import (
    DEVICE,
    SMOKE,
    backends,
    device_peaks,
    empty_cache,
    fraction,
    gpu_peak_mb,
    gpu_time,
    require_cuda,
)
from _harness import Harness

TARGET_X_PLAIN = 1.1  # factored projected gradients vs a plain step: a target, not a measurement
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}
SHAPE = SMOKE_SHAPE if SMOKE else LLAMA_1B


def _build(batch: int, seq: int):
    import transformers

    conf = transformers.LlamaConfig(**SHAPE)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialise on the GPU: a CPU init of 1.2 B parameters takes minutes
        model = transformers.LlamaForCausalLM(conf)
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, conf.vocab_size, (batch, seq), device=DEVICE)
    return model, ids


def _sketch_flops(n: int, d_in: int, d_out: int, k_in: int, k_out: int) -> int:
    """x @ P_in, g @ P_out and the per-token outer products, 2 FLOPs per multiply-add."""
    return 2 * n * (d_in * k_in + d_out * k_out + k_out * k_in)


def _model_rows(h: Harness, peaks, batch: int, seq: int, repeat: int) -> None:
    from bench_grad_proj import decoder_linears, plain_step, projector_step

    from mixkernels import GradientProjector

    model, ids = _build(batch, seq)
    params = sum(p.numel() for p in model.parameters())
    case = f"llama-{'smoke' if SMOKE else '1B'}-shape ({params / 1e9:.2f}B) bf16 B{batch} T{seq}"
    t_plain = gpu_time(lambda: plain_step(model, ids), warmup=1, repeat=repeat)
    m_plain = gpu_peak_mb(lambda: plain_step(model, ids))
    h.row(case=case, impl="plain fwd+bwd", seconds=t_plain, peak_mb=m_plain, x_plain=1.0, device=peaks.device)
    gp = GradientProjector(model, rank=(16, 16), modules=decoder_linears)
    for wg in (True, False):
        def step(wg=wg):
            return projector_step(gp, model, ids, wg)

        t = gpu_time(step, warmup=1, repeat=repeat)
        h.row(case=case, impl=f"factored r16x16 weight_grads={wg}", seconds=t, baseline="plain fwd+bwd",
              baseline_seconds=t_plain, x_plain=round(t / t_plain, 3), peak_mb=gpu_peak_mb(step),
              target=f"x_plain <= {TARGET_X_PLAIN}", device=peaks.device)


def _sketch_rows(h: Harness, peaks, batch: int, seq: int, repeat: int) -> None:
    import mixkernels

    n, d_in, d_out, k = batch * seq, SHAPE["hidden_size"], SHAPE["intermediate_size"], 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, d_in, device=DEVICE, generator=g).bfloat16()
    grad_out = torch.randn(n, d_out, device=DEVICE, generator=g).bfloat16()
    offsets = torch.arange(batch + 1, device=DEVICE) * seq
    p_in = torch.randn(d_in, k, device=DEVICE, generator=g) / k**0.5
    p_out = torch.randn(d_out, k, device=DEVICE, generator=g) / k**0.5
    flops = _sketch_flops(n, d_in, d_out, k, k)
    case = f"factored_sketch N={n} B={batch} {d_in}->{k} x {d_out}->{k} bf16"
    for backend in backends("factored_sketch"):
        def sketch(backend=backend):
            with mixkernels.backend(backend):
                return mixkernels.factored_sketch(x, grad_out, offsets, p_in, p_out)

        t = gpu_time(sketch, repeat=repeat)
        h.row(case=case, impl=f"factored_sketch [{backend}]", seconds=t,
              tflops=round(flops / t / 1e12, 2), bf16_fraction=fraction(flops / t / 1e12, peaks.bf16_tflops),
              device=peaks.device)


def gpu_main(quick: bool) -> None:
    require_cuda("bench_grad_proj")
    peaks = device_peaks(quick=quick)
    print(peaks.describe())
    batch, seq = (2, 16) if SMOKE else (4, 256) if quick else (8, 512)
    repeat = 3 if quick else 10
    h = Harness("grad_proj_cuda")
    _model_rows(h, peaks, batch, seq, repeat)
    empty_cache()
    _sketch_rows(h, peaks, batch, seq, repeat)
    h.finish()
    print(f"peaks: {peaks.describe()}")
