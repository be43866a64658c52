"""Data at scale: the token cache's cold build, warm start-up and memory on a synthetic chat mixture.

    PYTHONPATH=. python bench/bench_data.py                 # N = 10k, 100k (about 5 minutes)
    PYTHONPATH=. python bench/bench_data.py --full          # N = 10k, 100k, 1M (about 15 minutes)
    PYTHONPATH=. python bench/bench_data.py --tiny --no-csv # the smoke test's size

The mixture: ``--domains`` (4) JSONL files of chats, prompts of 10–80 words and responses of 5–120
words (uniform), one in ten with a second user/assistant exchange; SmolLM2-135M-Instruct's
tokenizer and chat template (``--tokenizer byte`` for a machine without the model).

For each N, in fresh processes:

* **cold build**: ``prepare_domains`` on an empty cache with ``--workers`` processes (default all
  cores): rows/s and tokens/s, and the ratio to the **baseline measured in the same run**: what
  every start did before the cache, one record at a time (``encode_messages``), timed on 2,000 rows;
* **warm start**: a new process reads the config, maps and verifies the cache, builds the sampler
  and collates the first batch (the data part of start-up; imports and the tokenizer load are
  excluded, as the model load is); with the baseline's start-up at that N extrapolated;
* **peak RSS** of that warm process, and its growth over the same run on 1,000 rows;
* **2 ranks**: two processes prepare the 10k mixture at once on an empty cache: how many built each
  domain (1 = every record tokenised once) and that both map identical folders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Harness

REPO = Path(__file__).resolve().parents[1]
_VOCAB = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask seem feel try leave call good new first last long great little own other old "
         "right big high different small large next early young important few public bad same able to of in for "
         "on with at by from up about into over after the and a that I it not he as you this but his they her she "
         "or an will my one all would there their what so if about which when can like no just him how your some "
         "could them see other than then now only its also back use two how our well even want because any these "
         "give most us 12 2024 3.5 % — café naïve")
WORDS = _VOCAB.split()


def make_mixture(folder: Path, n: int, domains: int, seed: int = 0) -> list[Path]:
    """``domains`` JSONL files with ``n`` chats in all (see the module docstring)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    files = []
    per = [n // domains + (1 if i < n % domains else 0) for i in range(domains)]
    for d, rows in enumerate(per):
        f = folder / f"domain{d}.jsonl"
        with open(f, "w") as out:
            for start in range(0, rows, 10000):
                k = min(10000, rows - start)
                plen = rng.integers(10, 81, k)
                rlen = rng.integers(5, 121, k)
                flat = words[rng.integers(0, len(words), int(plen.sum() + rlen.sum()))]
                lines = []
                pos = 0
                for i in range(k):
                    p = " ".join(flat[pos:pos + plen[i]])
                    pos += plen[i]
                    r = " ".join(flat[pos:pos + rlen[i]])
                    pos += rlen[i]
                    if (start + i) % 10 == 0:
                        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r},
                                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": r[:40] + "."}]
                        lines.append(json.dumps({"messages": msgs}))
                    else:
                        lines.append(json.dumps({"prompt": p, "response": r}))
                out.write("\n".join(lines) + "\n")
        files.append(f)
    return files


def write_config(folder: Path, files: list[Path], cache: Path, tokenizer: str) -> Path:
    import yaml

    cfg = {
        "model": {"name_or_path": None if tokenizer == "byte" else tokenizer, "tokenizer": tokenizer,
                  **({"config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2}} if tokenizer == "byte" else {})},
        "data": {"domains": {f.stem: str(f) for f in files}, "max_length": 512, "dev_fraction": 0.01,
                 "cache_dir": str(cache)},
        "train": {"micro_batch_size": 8, "grad_accum": 4, "seed": 0},
        "output_dir": str(folder / "run"),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _child(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--child", script, *args], capture_output=True, text=True,
                          env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line[len("RESULT="):])
    raise RuntimeError(f"child {script} {args} failed:\n{proc.stderr[-3000:]}")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_build(config: str, workers: str) -> dict:
    from mixtrain.config import load_config
    from mixtrain.data import load_tokenizer, prepare_config_domains

    cfg = load_config(config, [f"data.num_workers={workers}"])
    tok = load_tokenizer(cfg.model.tokenizer)
    t0 = time.perf_counter()
    doms = prepare_config_domains(cfg, tok)
    secs = time.perf_counter() - t0
    rows = sum(len(d.train[1]) + len(d.dev[1]) for d in doms)
    tokens = sum(int(d.manifest["parts"]["all"]["tokens"]) for d in doms)
    return {"seconds": secs, "rows": rows, "tokens": tokens, "status": [d.status for d in doms],
            "folders": [str(d.folder) for d in doms]}


def child_warm(config: str) -> dict:
    import torch

    from mixtrain.config import load_config
    from mixtrain.data import collate_examples, encode_config_domains, load_tokenizer
    from mixtrain.sampler import MixtureSampler, shard

    load_tokenizer(load_config(config).model.tokenizer)  # the tokenizer load belongs to the model's start-up
    base = _peak_mb()
    t0 = time.perf_counter()
    cfg = load_config(config)
    tok, enc = encode_config_domains(cfg)
    counts = [d.train_label_counts() for d in enc]
    lengths = [d.train_lengths() for d in enc]
    t = cfg.train
    sampler = MixtureSampler([d.size for d in enc], np.ones(len(enc)), global_batch_size=t.micro_batch_size * t.grad_accum,
                             seed=t.seed, domain_names=[d.name for d in enc])
    gb = sampler.next_global_batch()
    pairs = list(zip(gb.domains.tolist(), gb.examples.tolist()))
    assert sum(int(counts[d][e]) for d, e in pairs) > 0
    rows = shard(gb, 0, 1, t.micro_batch_size, t.grad_accum, [int(lengths[d][e]) for d, e in pairs])[0]
    batch = collate_examples(enc, rows, tok.pad_token_id)
    assert isinstance(batch["input_ids"], torch.Tensor)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_mb": _peak_mb(), "peak_growth_mb": _peak_mb() - base}


def baseline_rows_per_s(files: list[Path], tokenizer: str, n: int = 2000) -> float:
    """The pre-cache path: every record read and encoded on its own (``encode_messages``)."""
    from mixtrain.data import encode_messages, load_path, load_tokenizer

    tok = load_tokenizer(tokenizer)
    recs = []
    for f in files:
        recs += load_path(f)[: n // len(files)]
    t0 = time.perf_counter()
    for r in recs:
        encode_messages(tok, r.as_messages(), max_length=512, plain_text=r.plain_text)
    return len(recs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="10000,100000", help="comma-separated N (default 10000,100000)")
    ap.add_argument("--full", action="store_true", help="add N = 1,000,000")
    ap.add_argument("--tiny", action="store_true", help="N = 2000 only, byte tokenizer (smoke test)")
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--workers", default="0", help="build processes (0: every core)")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = {"build": child_build, "warm": child_warm}[a.child[0]]
        print("RESULT=" + json.dumps(fn(*a.child[1:])), flush=True)
        return
    sizes = [2000] if a.tiny else [int(x) for x in a.rows.split(",")] + ([1_000_000] if a.full else [])
    tokenizer = "byte" if a.tiny else a.tokenizer
    workers = str(int(a.workers) or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    h = Harness("data")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        small = root / "n1000"
        small.mkdir()
        small_files = make_mixture(small, 1000, a.domains)
        base_rate = baseline_rows_per_s(small_files, tokenizer, 1000 if a.tiny else 2000)
        small_cfg = write_config(small, small_files, small / "cache", tokenizer)
        _child("build", str(small_cfg), workers)
        warm_small = _child("warm", str(small_cfg))
        print(f"baseline (one record at a time): {base_rate:,.0f} rows/s; 1k-row warm start "
              f"{warm_small['seconds']:.2f} s, peak RSS {warm_small['peak_mb']:.0f} MB")
        for n in sizes:
            folder = root / f"n{n}"
            folder.mkdir()
            t0 = time.perf_counter()
            files = make_mixture(folder, n, a.domains)
            gen = time.perf_counter() - t0
            cfg = write_config(folder, files, folder / "cache", tokenizer)
            cold = _child("build", str(cfg), workers)
            again = _child("build", str(cfg), workers)
            assert set(again["status"]) == {"cached"}, again["status"]
            warm = min((_child("warm", str(cfg)) for _ in range(3)), key=lambda r: r["seconds"])
            rate = cold["rows"] / cold["seconds"]
            h.row(case=f"N={n:,} D={a.domains} tokens={cold['tokens']:,}", impl=f"cache ({workers} workers)",
                  seconds=cold["seconds"], baseline="one record at a time", baseline_seconds=n / base_rate,
                  rows_per_s=round(rate), tokens_per_s=round(cold["tokens"] / cold["seconds"]),
                  second_call_s=round(again["seconds"], 2), warm_start_s=round(warm["seconds"], 2),
                  baseline_start_s=round(n / base_rate, 1), peak_rss_mb=round(warm["peak_mb"]),
                  rss_vs_1k_mb=round(warm["peak_mb"] - warm_small["peak_mb"]),
                  source_mb=round(sum(f.stat().st_size for f in files) / 2**20), generate_s=round(gen, 1))
            for f in files:
                f.unlink()  # keep the disk footprint to one mixture at a time
            import shutil

            shutil.rmtree(folder / "cache", ignore_errors=True)
        # two ranks on an empty cache
        n2 = sizes[0]
        folder = root / "ranks"
        folder.mkdir()
        files = make_mixture(folder, n2, a.domains)
        cfg = write_config(folder, files, folder / "cache", tokenizer)
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "build", str(cfg), "1"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        outs = [json.loads(next(x for x in p.communicate()[0].splitlines() if x.startswith("RESULT="))[7:])
                for p in procs]
        built = [sum(o["status"][i] != "cached" for o in outs) for i in range(a.domains)]
        same = outs[0]["folders"] == outs[1]["folders"]
        print(f"2 ranks on an empty cache, N={n2:,}: builds per domain {built} (1 = tokenised once); "
              f"both ranks map the same folders: {same}")
        h.row(case=f"2 ranks N={n2:,}", impl="cache", seconds=max(o["seconds"] for o in outs),
              builds_per_domain=max(built), same_folders=same)
    if a.no_csv:
        print(h.table())
    else:
        h.finish()


if __name__ == "__main__":
    main()
