"""Benchmark: per-example projected gradients and on-the-fly projections (CPU).

    python bench/bench_grad_proj.py            # the goal sizes (minutes on 2 shared cores)
    python bench/bench_grad_proj.py --tiny     # smoke test at the tiniest sizes
    python bench/bench_grad_proj.py --quick    # the same as --tiny on CPU
    python bench/bench_grad_proj.py --device cuda [--quick]   # GPU, 1B Llama shape (bench/_grad_proj_gpu.py)

Part 1, model Llama-shaped d=512, intermediate 1376, 4 layers, vocab 4096, B=8, T=128, fp32,
all decoder linear layers projected, factored rank (16, 16). Rows (time ratio to the plain step
in ``x_plain``; ``speedup_vs_baseline`` = baseline time / this time):
  plain fwd+bwd                          the baseline step (per-example CE summed, backward)
  factored (weight_grads=True/False)     GradientProjector(kind="factored")
  hooks+einsum factored                  LoGra/LogIX-style: forward hook x@P_in, full backward
                                         hook g@P_out, einsum outer products (same P's)
  GradientProjector rademacher K=4096    per-module per-example grads + on-the-fly project
  torch.func + dense Rademacher K=4096   vmap(grad) per-example grads [B, 12.6M], then
                                         mixkernels.project (on the fly; a stored R would be 206 GB)
Peak memory: extra peak RSS of a fresh child process running one step.

Part 1b (``--model smollm2-135m-instruct``): the real pretrained model (30 layers, vocabulary
49152) with LoRA r = 16 on every attention and MLP linear (base frozen), B = 8, T = 128: the
trainable LoRA layers (what GradEx projects) through the factored projector, against the plain
LoRA forward + backward.

Part 2, project [8, 12.6M] -> 4096: ours (rademacher, sjlt; full input) against TRAK's
BasicProjector (rademacher, CPU, fp32). TRAK is timed on a slice of the input rows and scaled
linearly to 12.6M rows (its cost is linear in in_dim: one [in_dim, 100] block GEMM per 100
columns), and the table says so. Memory: extra peak RSS of a child running ours on the full input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import Harness, child_peak_mb, report_child_peak

from mixkernels import GradientProjector, project, projection_matrix
from mixkernels.grad_projector import module_seed

FULL = {"d": 512, "inter": 1376, "layers": 4, "heads": 8, "vocab": 4096, "b": 8, "t": 128, "k": 4096, "p_rows": 12_600_000, "trak_rows": 262_144}
TINY = {"d": 64, "inter": 96, "layers": 2, "heads": 4, "vocab": 256, "b": 2, "t": 16, "k": 256, "p_rows": 100_000, "trak_rows": 20_000}


def build(cfg):
    import transformers

    conf = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["d"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=max(256, cfg["t"]),
    )
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    ids = torch.randint(0, cfg["vocab"], (cfg["b"], cfg["t"]))
    return model, ids


def example_loss(logits, ids):
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids[:, 1:, None])[..., 0].mean(1)


def decoder_linears(name, module):
    return ".layers." in name


def plain_step(model, ids):
    model.zero_grad(set_to_none=True)
    example_loss(model(input_ids=ids).logits, ids).sum().backward()


def projector_step(gp, model, ids, weight_grads):
    model.zero_grad(set_to_none=True)
    with gp.capture(weight_grads=weight_grads):
        example_loss(model(input_ids=ids).logits, ids).sum().backward()
    return gp.grads()


class EinsumFactored:
    """The hook pipeline of LoGra/LogIX-style tools, written plainly (no mixkernels ops)."""

    def __init__(self, model, rank, seed=0):
        self.mods = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and decoder_linears(n, m)]
        k_out, k_in = rank
        self.p = {
            n: (projection_matrix(m.in_features, k_in, seed=module_seed(seed, n, "in")),
                projection_matrix(m.out_features, k_out, seed=module_seed(seed, n, "out")))
            for n, m in self.mods
        }
        self.out = {}

    @contextlib.contextmanager
    def capture(self):
        saved, handles = {}, []
        for n, m in self.mods:
            p_in, p_out = self.p[n]

            def fwd(mod, args, out, n=n, p_in=p_in):
                saved[n] = args[0] @ p_in

            def bwd(mod, grad_in, grad_out, n=n, p_out=p_out):
                self.out[n] = torch.einsum("bto,bti->boi", grad_out[0] @ p_out, saved.pop(n))

            handles += [m.register_forward_hook(fwd), m.register_full_backward_hook(bwd)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def grads(self):
        return torch.cat([self.out[n].flatten(1) for n, _ in self.mods], 1)


def einsum_step(ef, model, ids):
    model.zero_grad(set_to_none=True)
    with ef.capture():
        example_loss(model(input_ids=ids).logits, ids).sum().backward()
    return ef.grads()


def torch_func_step(model, ids, k):
    from torch.func import functional_call, grad, vmap

    names = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and decoder_linears(n, m)]
    params = dict(model.named_parameters())
    wanted = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in wanted}

    def loss_one(w, one):
        out = functional_call(model, ({**rest, **w},), (), {"input_ids": one[None]})
        return example_loss(out.logits, one[None])[0]

    g = vmap(grad(loss_one), in_dims=(None, 0))(wanted, ids)
    v = torch.cat([g[n].flatten(1) for n in names], 1)
    del g
    return project(v, k, seed=0, kind="rademacher")


def trak_projector(rows, k):
    from trak.projectors import BasicProjector, ProjectionType

    return BasicProjector(grad_dim=rows, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                          device=torch.device("cpu"))


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_pretrained(name: str, b: int = 8, t: int = 128):
    """A pretrained model by name + LoRA r=16 on every attention/MLP linear, and random token ids."""
    import peft
    import transformers

    from mixtrain.models import resolve_model

    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS)).get_base_model().eval()
    with torch.no_grad():  # a trained adapter: B != 0, so gradients reach lora_A too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    torch.manual_seed(0)
    return model, torch.randint(0, model.config.vocab_size, (b, t))


def trainable_linears(name, module):
    return isinstance(module, torch.nn.Linear) and module.weight.requires_grad and "lm_head" not in name


def pretrained_part(h: Harness, name: str, script: Path) -> None:
    model, ids = build_pretrained(name)
    case = f"{name} + LoRA r16 (all linears) B{ids.shape[0]} T{ids.shape[1]}"
    gp = GradientProjector(model, rank=(16, 16), modules=trainable_linears)
    t_plain = h.time(lambda: plain_step(model, ids))
    m_plain = child_peak_mb(script, ["--child", "pretrained-plain", "--model", name])
    h.row(case=case, impl="plain LoRA fwd+bwd", seconds=t_plain, peak_mb=m_plain, x_plain=1.0, x_plain_mem=1.0)
    for wg in (False, True):
        t = h.time(lambda wg=wg: projector_step(gp, model, ids, wg))
        m = child_peak_mb(script, ["--child", f"pretrained-factored-{'wg' if wg else 'nowg'}", "--model", name])
        h.row(case=case, impl=f"factored r16x16 weight_grads={wg}", seconds=t, baseline="plain LoRA fwd+bwd",
              baseline_seconds=t_plain, peak_mb=m, x_plain=round(t / t_plain, 3),
              x_plain_mem=round(m / m_plain, 3) if m_plain > 0 else "")


def pretrained_child(what: str, name: str) -> None:
    torch.set_num_threads(2)
    model, ids = build_pretrained(name)
    plain_step(model, ids)
    if what == "plain":
        report_child_peak(lambda: plain_step(model, ids))
    else:
        gp = GradientProjector(model, rank=(16, 16), modules=trainable_linears)
        report_child_peak(lambda: projector_step(gp, model, ids, what == "factored-wg"))


def child(what: str, cfg) -> None:
    torch.set_num_threads(2)
    if what.startswith("project-"):
        x = torch.randn(8 if cfg is FULL else 2, cfg["p_rows"])
        report_child_peak(lambda: project(x, cfg["k"], seed=0, kind=what.removeprefix("project-")))
        return
    model, ids = build(cfg)
    plain_step(model, ids)  # allocate .grad buffers and warm up before the baseline is taken
    if what == "plain":
        report_child_peak(lambda: plain_step(model, ids))
    else:
        gp = GradientProjector(model, rank=(16, 16), modules=decoder_linears)
        report_child_peak(lambda: projector_step(gp, model, ids, what == "factored-wg"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU: the same as --tiny; cuda: smaller batch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", default=None)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: model,project,trak,torchfunc")
    parser.add_argument("--model", default=None, help="also the pretrained-model part (e.g. smollm2-135m-instruct)")
    args = parser.parse_args()
    if args.device == "cuda":
        from _grad_proj_gpu import gpu_main

        gpu_main(args.quick)
        return
    args.tiny = args.tiny or args.quick
    cfg = TINY if args.tiny else FULL
    if args.child and args.child.startswith("pretrained-"):
        pretrained_child(args.child.removeprefix("pretrained-"), args.model)
        return
    if args.child:
        child(args.child, cfg)
        return
    skip = set(filter(None, args.skip.split(",")))
    h = Harness("grad_proj", repeat=3, warmup=1, threads=2)
    script, tiny = Path(__file__), (["--tiny"] if args.tiny else [])
    case = f"llama d{cfg['d']} L{cfg['layers']} B{cfg['b']} T{cfg['t']}"
    if "model" not in skip:
        model, ids = build(cfg)
        gp = GradientProjector(model, rank=(16, 16), modules=decoder_linears)
        ef = EinsumFactored(model, (16, 16))
        t_plain = h.time(lambda: plain_step(model, ids))
        m_plain = child_peak_mb(script, ["--child", "plain", *tiny])
        h.row(case=case, impl="plain fwd+bwd", seconds=t_plain, peak_mb=m_plain, x_plain=1.0, x_plain_mem=1.0)
        for wg in (True, False):
            t = h.time(lambda wg=wg: projector_step(gp, model, ids, wg))
            m = child_peak_mb(script, ["--child", "factored-wg" if wg else "factored-nowg", *tiny])
            h.row(case=case, impl=f"factored r16x16 weight_grads={wg}", seconds=t, baseline="plain fwd+bwd",
                  baseline_seconds=t_plain, peak_mb=m, x_plain=round(t / t_plain, 3), x_plain_mem=round(m / m_plain, 3) if m_plain > 0 else "")
        t_e = h.time(lambda: einsum_step(ef, model, ids))
        h.row(case=case, impl="hooks+einsum factored (LogIX-style)", seconds=t_e, baseline="plain fwd+bwd",
              baseline_seconds=t_plain, x_plain=round(t_e / t_plain, 3))
        t_fact = h.time(lambda: projector_step(gp, model, ids, False), repeat=1, warmup=0)
        gpr = GradientProjector(model, kind="rademacher", proj_dim=cfg["k"], modules=decoder_linears)
        t_r = h.time(lambda: projector_step(gpr, model, ids, False), repeat=1, warmup=0)
        h.row(case=case, impl=f"GradientProjector rademacher K={cfg['k']} weight_grads=False", seconds=t_r,
              x_plain=round(t_r / t_plain, 3))
        if "torchfunc" not in skip:
            t_f = h.time(lambda: torch_func_step(model, ids, cfg["k"]), repeat=1, warmup=0)
            h.row(case=case, impl=f"torch.func vmap(grad) + on-the-fly Rademacher K={cfg['k']}", seconds=t_f,
                  x_plain=round(t_f / t_plain, 3))
            h.row(case=case, impl="factored weight_grads=False (same run, 1 rep)", seconds=t_fact,
                  baseline="torch.func + Rademacher", baseline_seconds=t_f, x_plain=round(t_fact / t_plain, 3))
        del model, gp, ef, gpr
    if args.model:
        pretrained_part(h, args.model, script)
    if "project" not in skip:
        n_rows = 8 if cfg is FULL else 2
        pcase = f"project [{n_rows}, {cfg['p_rows']:,}] -> {cfg['k']}"
        x = torch.randn(n_rows, cfg["p_rows"])
        t_trak = None
        if "trak" not in skip and importlib.util.find_spec("trak") is None:
            print("TRAK not installed (pip install -e '.[bench]'): its row is skipped")
            skip.add("trak")
        if "trak" not in skip:
            rows = cfg["trak_rows"]
            proj = trak_projector(rows, cfg["k"])
            xs = x[:, :rows].contiguous()
            t_slice = h.time(lambda: proj.project(xs, model_id=0), repeat=1, warmup=0)
            t_trak = t_slice * cfg["p_rows"] / rows
            del proj
            h.row(case=pcase, impl=f"TRAK BasicProjector rademacher (timed on {rows:,} rows, scaled x{cfg['p_rows'] / rows:.1f})",
                  seconds=t_trak, peak_mb=None, note="stores [in_dim, 100] fp32 blocks: 5 GB at 12.6M rows")
        for kind, rep in (("sjlt", 3), ("rademacher", 1)):
            t = h.time(lambda kind=kind: project(x, cfg["k"], seed=0, kind=kind), repeat=rep, warmup=1 if kind == "sjlt" else 0)
            m = child_peak_mb(script, ["--child", f"project-{kind}", *tiny])
            h.row(case=pcase, impl=f"mixkernels.project {kind} (cxx, full input)", seconds=t,
                  baseline="TRAK BasicProjector" if t_trak else "", baseline_seconds=t_trak, peak_mb=m,
                  note="peak extra MB excludes the input itself")
    h.finish()


if __name__ == "__main__":
    main()
