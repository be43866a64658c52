"""How an MoE model routes each domain: ``python -m mixtrain router-stats CONFIG [k=v ...]``.

The first ``rows`` dev rows of every domain of the config go through the config's model in eval
mode, without gradients; every MoE router layer's top-k assignments are counted per domain, pads
excluded (``mixkernels.hf.RouterStatsCollector`` + ``mixkernels.router_stats``). The report (a
dict, also written as JSON) holds, per collected layer ``l``:

* ``expert_load[l][d]``: domain d's top-k assignment histogram over the E experts (sums to 1);
* ``mean_entropy[l][d]``: mean routing entropy per token, in nats (log E: a uniform router);
* ``effective_experts[l]``: exp of the entropy of the load pooled over domains (E: balanced; k:
  every token goes to the same k experts, a collapsed router);
* ``distance[l]``: ``[D, D]`` L2 distances between the domains' histograms, what ``dynamic_moe``
  measures (released default: last layer), and ``mean_distance[l]`` their mean over domain pairs
  (0: the layer routes every domain alike, so ``dynamic_moe`` has nothing to act on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text
from .config import Config, ConfigError
from .data import collate_examples, encode_config_domains
from .engine import build_model
from .policies.dynamic_moe import distances

__all__ = ["format_routing", "routing_report"]


def routing_report(cfg: Config, *, rows: int = 16, layers: str | Sequence[int] = "all",
                   out: str | Path | None = None) -> dict[str, Any]:
    """Per-domain routing of ``cfg``'s model over ``rows`` dev rows per domain (module docstring);
    written to ``out`` (default ``<output_dir>/router_stats.json``) and returned."""
    from mixkernels.hf import RouterStatsCollector

    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"router-stats --rows: got {rows!r}, expected an integer >= 1")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tok, enc = encode_config_domains(cfg)
    names = [d.name for d in enc]
    missing = [d.name for d in enc if not d.dev]
    if missing:
        raise ConfigError(f"router-stats: domain(s) {missing} have no dev rows; set data.dev_fraction > 0")
    model = build_model(cfg, tok.vocab_size).eval()
    try:
        collector = RouterStatsCollector(model, layers=layers)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"router-stats: model {cfg.model.name_or_path or cfg.model.config.get('model_type')!r} "
                          f"has no MoE routers mixkernels can hook: {e}") from None
    batch_size = cfg.train.micro_batch_size
    total = None
    with torch.no_grad(), collector:
        for di, dom in enumerate(enc):
            picked = list(range(min(rows, len(dom.dev))))
            for start in range(0, len(picked), batch_size):
                batch = collate_examples(enc, [(di, r) for r in picked[start:start + batch_size]], tok.pad_token_id, "dev")
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                st = collector.stats(group_ids=batch["domain_ids"], num_groups=len(names),
                                     attention_mask=batch["attention_mask"])
                total = st if total is None else total.merge(st)
    assert total is not None
    load = total.expert_load().double()  # [L, D, E]
    pooled = total.expert_counts.sum(1).double()
    pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(1)
    ent = -(pooled * pooled.clamp_min(1e-300).log()).sum(-1)
    dist = [distances(total.expert_counts[i].double()) for i in range(total.num_layers)]
    d = len(names)
    pairs = max(1, d * (d - 1))
    report = {
        "version": 1,
        "model": cfg.model.name_or_path,
        "domains": names,
        "rows": [min(rows, len(dom.dev)) for dom in enc],
        "tokens": total.token_count.tolist(),
        "layers": collector.layer_indices,
        "router_names": collector.router_names,
        "top_k": collector.top_k,
        "experts": total.num_experts,
        "expert_load": load.tolist(),
        "mean_entropy": total.mean_entropy().double().tolist(),
        "effective_experts": ent.exp().tolist(),
        "distance": [x.tolist() for x in dist],
        "mean_distance": [float(x.sum() / pairs) for x in dist],
    }
    path = Path(out) if out is not None else Path(cfg.output_dir) / "router_stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))
    report["path"] = str(path)
    return report


def format_routing(report: dict[str, Any]) -> str:
    """A plain-text table: one line per layer, then the last layer's per-domain histograms."""
    e, k = report["experts"], report["top_k"]
    lines = [(f"{report['model']}: {e} experts, top-{k}; {len(report['domains'])} domains, "
              f"{sum(report['tokens'])} dev tokens"),
             f"{'layer':>5}  {'effective experts':>17}  {'mean domain distance':>20}  {'busiest expert':>16}"]
    for i, layer in enumerate(report["layers"]):
        # tokens (of the domain that uses it most) whose top-k holds the busiest expert; 1 = all of them
        top = max(max(row) for row in report["expert_load"][i]) * k
        lines.append(f"{layer:>5}  {report['effective_experts'][i]:>17.2f}  {report['mean_distance'][i]:>20.4f}"
                     f"  {top:>16.3f}")
    lines.append(f"last layer ({report['layers'][-1]}), expert load per domain (k = {k} picks per token):")
    width = max(len(n) for n in report["domains"])
    for name, row in zip(report["domains"], report["expert_load"][-1]):
        lines.append(f"  {name:<{width}}  " + " ".join(f"{x:.3f}" for x in row))
    lines.append(f"(uniform: effective experts {e}, entropy {math.log(e):.3f}; collapsed: {k})")
    return "\n".join(lines)
