"""Benchmark of the in-memory alpha sweep at Llama-2-7B shapes (random weights), on 1 and 2 GPUs.

    python3 bench/sweep_speed.py --wikitext /path/wiki.test.raw --work /tmp/sb --out results/
    python3 bench/sweep_speed.py --tiny ...        # the same steps on a 2-layer model (CPU smoke)

Steps (each timed; the sweeps are the literal CLI in subprocesses):
1. a BPE tokenizer with Llama-2's vocabulary size (32000) trained on wiki.valid.raw beside the
   test file (no Llama tokenizer is reachable offline; token counts are therefore not Llama's);
2. a LlamaForCausalLM with Llama-2-7B's config (4096 hidden, 11008 MLP, 32 layers, 32 heads,
   context 4096), RANDOM weights (seeded, transformers' init), bfloat16, built on the GPU;
   saved as the base; then a LoRA-like update B A (rank 8, planted singular values 1.5 to 3 times
   the matrix's sigma_1, random directions) added to q, k, v, o, gate, up and down of every
   layer (224 matrices) and saved as the tuned model;
3. `intruder scan base tuned` (the intruders the sweep rescales);
4. `intruder scale --scan ... --alpha 0,0.25,0.5,0.75,1 --eval wikitext:PATH` with one GPU
   visible (CUDA_VISIBLE_DEVICES=0) and with two (one model copy per GPU);
5. optionally the same with `--shard` (one model spread over both GPUs) and under torchrun.

Everything measured lands in OUT/summary.json (and the sweeps' scale-results.json files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tokenizer(train_file: str, out_dir: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with open(train_file, encoding="utf-8") as fh:
        lines = [ln for ln in fh.read().split("\n") if ln.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def build_models(work: str, tiny: bool, train_file: str, rank: int = 8, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if tiny:
        cfg = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                   vocab_size=1000)
    else:  # Llama-2-7B
        cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32,
                   max_position_embeddings=4096, vocab_size=32000)
    base, tuned = os.path.join(work, "base"), os.path.join(work, "tuned")
    t0 = time.perf_counter()
    fast = build_tokenizer(train_file, base, cfg["vocab_size"])
    fast.save_pretrained(tuned)
    t_tok = time.perf_counter() - t0
    config = LlamaConfig(**cfg, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
                         rms_norm_eps=1e-5)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = "bfloat16"
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(base)
    t_save = time.perf_counter() - t0
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                for name in MODULES:
                    lin = getattr(mod, name, None)
                    if lin is None:
                        continue
                    w = lin.weight  # (m, n) bfloat16
                    m, n = w.shape
                    # sigma_1 of a Gaussian matrix, about std * (sqrt(m) + sqrt(n))
                    s1 = float(w.float().std()) * (m ** 0.5 + n ** 0.5)
                    b = torch.linalg.qr(torch.randn(m, rank, generator=g, device=dev))[0]
                    a = torch.linalg.qr(torch.randn(n, rank, generator=g, device=dev))[0]
                    s = torch.linspace(3.0, 1.5, rank, device=dev) * s1
                    w.add_(((b * s) @ a.T).to(w.dtype))  # (m, n) LoRA-like B A
    t0 = time.perf_counter()
    model.save_pretrained(tuned)
    t_save += time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {"base": base, "tuned": tuned, "params": n_params, "config": cfg,
            "tokenizer_seconds": t_tok, "build_seconds": t_build, "save_seconds": t_save,
            "planted": f"rank {rank} in every {'/'.join(MODULES)} matrix, sigma 3..1.5 x sigma_1 (Gaussian estimate)"}


def run(cmd, env=None, log=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if log:
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n\n" + p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return {"wall_seconds": wall, "stdout": p.stdout}


def sweep_summary(results_json: str, wall: float) -> dict:
    doc = json.load(open(results_json))
    t = doc["timing"]
    jobs = t["jobs"]
    alpha_jobs = [j for j in jobs if j["job"] != "base"]
    evals = [j["eval_seconds"] for j in alpha_jobs]
    resc = [j["rescale_seconds"] for j in alpha_jobs]
    wp = {m["label"]: next((r["value"] for r in m["results"] if r["metric"] == "word_perplexity"),
                           None) for m in doc["models"]}
    first = doc["models"][0]["results"][0]
    return {
        "wall_seconds": wall, "sweep_wall_seconds": t.get("wall_seconds"),
        "devices": t["devices"], "jobs": jobs,
        "eval_seconds_mean": sum(evals) / len(evals),
        "rescale_seconds_mean": sum(resc) / len(resc),
        "rescale_over_eval": max(r / e for r, e in zip(resc, evals)),
        "load_seconds": [j["load_seconds"] for j in jobs if j["load_seconds"]],
        "peak_gpu_gib": [[round(b / 2 ** 30, 2) for b in w["peak_gpu_bytes"]] for w in t["workers"]],
        "peak_host_gib": [round(w["peak_host_bytes"] / 2 ** 30, 2) for w in t["workers"]],
        "kept_original_gib": [round(w["kept_original_bytes"] / 2 ** 30, 2) for w in t["workers"]],
        "word_perplexity": wp, "protocol": first["protocol"], "n_words": first["n_units"],
        "tokens": dict(first["extra"]).get("tokens"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wikitext", required=True, help="wiki.test.raw (wiki.valid.raw beside it "
                    "trains the tokenizer)")
    ap.add_argument("--work", required=True, help="scratch folder for the two checkpoints")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="WikiText articles (default all 62)")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--modes", default="1gpu,2gpu", help="1gpu,2gpu,shard,torchrun")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", INTRUDER_CACHE_DIR="")
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "argv": sys.argv[1:]}
    try:
        import torch

        summary["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        summary["torch"] = torch.__version__
    except Exception:  # noqa: BLE001
        pass
    save = lambda: json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"),  # noqa
                             indent=1)
    train = os.path.join(os.path.dirname(args.wikitext), "wiki.valid.raw")
    summary["models"] = build_models(args.work, args.tiny, train)
    save()
    print("models built", json.dumps(summary["models"]), flush=True)
    scan = os.path.join(args.work, "scan.json")
    r = run([sys.executable, "-m", "intruder", "scan", summary["models"]["base"],
             summary["models"]["tuned"], "-o", scan, "--no-cache"], env,
            os.path.join(args.out, "scan.log"))
    summary["scan_wall_seconds"] = r["wall_seconds"]
    rep = json.load(open(scan))
    summary["intruders"] = sum(len(l["intruders"]) for l in rep["layers"])
    summary["matrices_with_intruders"] = sum(1 for l in rep["layers"] if l["intruders"])
    save()
    print("scan", summary["scan_wall_seconds"], summary["intruders"], flush=True)
    base_cmd = [sys.executable, "-m", "intruder", "scale", "--scan", scan, "--alpha", args.alphas,
                "--eval", f"wikitext:{args.wikitext}", "--force", "-q", "--json"]
    if args.limit:
        base_cmd += ["--limit", str(args.limit)]
    for mode in args.modes.split(","):
        out = os.path.join(args.work, f"sweep-{mode}")
        e = dict(env)
        cmd = base_cmd + ["-o", out]
        if mode == "1gpu":
            e["CUDA_VISIBLE_DEVICES"] = "0"
        elif mode == "shard":
            cmd += ["--shard"]
        elif mode == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "-m", "intruder"] + cmd[3:]
        r = run(cmd, e, os.path.join(args.out, f"sweep-{mode}.log"))
        summary[f"sweep_{mode}"] = dict(sweep_summary(os.path.join(out, "scale-results.json"),
                                                      r["wall_seconds"]), command=" ".join(cmd))
        save()
        print(mode, json.dumps({k: v for k, v in summary[f"sweep_{mode}"].items()
                                if k != "jobs"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
