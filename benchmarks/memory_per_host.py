"""Memory per host for DeepSeek-V4 sharded over N Macs, from a config.json.

Counts every tensor of the model (the same shapes as
mlx_arch_plugins.deepseek_v4.model) and prices it per format:

* ``official``: DeepSeek's FP8/FP4 checkpoint as the plugin loads it: dense
  FP8 linears become mxfp8 (8 bits + one 8-bit scale per 32 = 8.25 bits),
  FP4 routed experts mxfp4 (4.25 bits), BF16 tensors stay BF16, float32
  ones (hyper-connections, sinks, ape, router) float32.
* ``mlx4``: an ``mlx_lm.convert -q`` 4-bit affine conversion (group 64:
  4 bits + BF16 scale and bias per 64 = 4.5 bits) of the linear layers, the
  embedding and the head included, but not the compressors and the
  indexer's head weights (kept BF16 as in the official checkpoint); the rest
  as above.

Weights per host:
* tensor parallel: query heads, output groups, routed and shared experts
  split N ways; embedding, head, KV projection, compressors, indexer,
  router, norms and hyper-connections replicated;
* pipeline: the heaviest rank (rank 0: the extra layers of an uneven split
  and the MTP block); every rank keeps embedding, head and final norms.

KV cache per sequence (BF16): per layer the sliding window, one compressed
entry per ``ratio`` tokens (growth buffers in steps of 256 entries), the
indexer keys of ratio-4 layers and the compressor's pending float32 rows.
Tensor parallel replicates it (one KV head); pipeline splits it by layer.

    python benchmarks/memory_per_host.py CONFIG.json [--hosts 2 4 8]
        [--context 131072 1048576] [--markdown] [--disk-bytes]
"""

import argparse
import json
import math
from pathlib import Path

GIB = 1024**3


def tensors(cfg, layer_id):
    """(name, n_params, kind, sharded) for one block; kind is one of
    dense (FP8 linear), expert (FP4 linear), lin16 (BF16 linear that MLX
    conversions quantize), keep16 (BF16 linear they keep: compressors and
    the indexer's head weights, see Model.quant_predicate), bf16, f32, i32."""
    D, H, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, ol, G = cfg["q_lora_rank"], cfg["o_lora_rank"], cfg["o_groups"]
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    shared = inter * cfg.get("n_shared_experts", 1)
    hc = cfg.get("hc_mult", 4)
    ratio = cfg["compress_ratios"][layer_id]
    t = [
        ("attn.wq_a", D * qr, "dense", False),
        ("attn.q_norm", qr, "bf16", False),
        ("attn.wq_b", qr * H * hd, "dense", True),
        ("attn.wkv", D * hd, "dense", False),
        ("attn.kv_norm", hd, "bf16", False),
        ("attn.wo_a", H * hd * ol, "dense", True),
        ("attn.wo_b", G * ol * D, "dense", True),
        ("attn.attn_sink", H, "f32", True),
        ("ffn.gate.weight", E * D, "f32", False),  # router kept in float32
        ("ffn.experts", 3 * E * D * inter, "expert", True),
        ("ffn.shared_experts", 3 * D * shared, "dense", True),
        ("norms", 2 * D, "bf16", False),
        ("hc", 2 * ((2 + hc) * hc * hc * D + (2 + hc) * hc + 3), "f32", False),
    ]
    if layer_id < cfg.get("num_hash_layers", 0):
        t.append(("ffn.gate.tid2eid", cfg["vocab_size"] * cfg["num_experts_per_tok"], "i32", False))
    else:
        t.append(("ffn.gate.bias", E, "f32", False))
    if ratio:
        w = hd * (2 if ratio == 4 else 1)
        t += [
            ("attn.compressor.wkv+wgate", 2 * D * w, "keep16", False),
            ("attn.compressor.ape", ratio * w, "f32", False),
            ("attn.compressor.norm", hd, "bf16", False),
        ]
    if ratio == 4:
        ih, ihd = cfg["index_n_heads"], cfg["index_head_dim"]
        t += [
            ("attn.indexer.wq_b", qr * ih * ihd, "dense", False),
            ("attn.indexer.weights_proj", D * ih, "keep16", False),
            ("attn.indexer.compressor.wkv+wgate", 2 * D * 2 * ihd, "keep16", False),
            ("attn.indexer.compressor.ape", 4 * 2 * ihd, "f32", False),
            ("attn.indexer.compressor.norm", ihd, "bf16", False),
        ]
    if layer_id >= cfg["num_hidden_layers"]:  # MTP block extras
        t += [
            ("mtp.e_proj+h_proj", 2 * D * D, "dense", False),
            ("mtp.norms", 3 * D, "bf16", False),
            ("mtp.hc_head", hc * hc * D + hc + 1, "f32", False),
        ]
    return t


def globals_(cfg):
    D, V, hc = cfg["hidden_size"], cfg["vocab_size"], cfg.get("hc_mult", 4)
    return [
        ("embed", V * D, "lin16", False),
        ("head", V * D, "lin16", False),
        ("norm", D, "bf16", False),
        ("hc_head", hc * hc * D + hc + 1, "f32", False),
    ]


def bits(kind, fmt):
    if kind in ("f32", "i32"):
        return 32
    if kind in ("bf16", "keep16"):
        return 16
    if fmt == "mlx4":
        return 4.5
    return {"dense": 8.25, "expert": 4.25, "lin16": 16}[kind]


def weights_per_host(cfg, fmt, n_hosts, mode):
    L = cfg["num_hidden_layers"]
    n_mtp = cfg.get("num_nextn_predict_layers", 0)

    def price(ts, share):
        return sum(p * bits(k, fmt) / 8 / (share if s else 1) for _, p, k, s in ts)

    g = price(globals_(cfg), 1)
    if mode == "tensor":
        per = sum(price(tensors(cfg, i), n_hosts) for i in range(L + n_mtp))
        return g + per
    best = 0
    for r, (start, count) in enumerate(_ranges(L, n_hosts)):
        ids = list(range(start, start + count))
        if r == 0:
            ids += list(range(L, L + n_mtp))  # MTP stays on rank 0
        best = max(best, g + sum(price(tensors(cfg, i), 1) for i in ids))
    return best


def kv_bytes(cfg, ctx, layer_ids):
    hd, win = cfg["head_dim"], cfg["sliding_window"]
    total = 0
    for i in layer_ids:
        m = cfg["compress_ratios"][i]
        total += min(ctx, win) * hd * 2
        if m:
            entries = math.ceil((ctx // m) / 256) * 256
            total += entries * hd * 2
            rows, width = (2 * m, 2 * hd) if m == 4 else (m, hd)
            total += rows * width * 4 * 2
        if m == 4:
            ihd = cfg["index_head_dim"]
            total += entries * ihd * 2 + 8 * 2 * ihd * 4 * 2
    return total


def kv_per_host(cfg, ctx, n_hosts, mode):
    L = cfg["num_hidden_layers"]
    if mode == "tensor":
        return kv_bytes(cfg, ctx, range(L))
    return max(kv_bytes(cfg, ctx, range(s, s + c)) for s, c in _ranges(L, n_hosts))


def _ranges(L, n):
    base, extra = divmod(L, n)
    split = [base + (1 if r < extra else 0) for r in range(n)]
    return [(sum(split[r + 1 :]), split[r]) for r in range(n)]


def official_disk_bytes(cfg):
    """Size of DeepSeek's safetensors files from the same counts (a check
    of the counting against the published Flash total)."""
    blk = cfg["quantization_config"]["weight_block_size"][0]
    total = 0
    L = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    D, H, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    qr, ol, G = cfg["q_lora_rank"], cfg["o_lora_rank"], cfg["o_groups"]
    inter = cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 1)
    ih, ihd = cfg["index_n_heads"], cfg["index_head_dim"]
    dense_shapes = {
        "attn.wq_a": [(qr, D)],
        "attn.wq_b": [(H * hd, qr)],
        "attn.wkv": [(hd, D)],
        "attn.wo_a": [(G * ol, H * hd // G)],
        "attn.wo_b": [(D, G * ol)],
        "ffn.shared_experts": [(inter, D), (inter, D), (D, inter)],
        "attn.indexer.wq_b": [(ih * ihd, qr)],
        "mtp.e_proj+h_proj": [(D, D), (D, D)],
    }
    for i in range(L):
        for name, n, kind, _ in tensors(cfg, i):
            if kind == "dense":
                nb = sum(math.ceil(a / blk) * math.ceil(b / blk) for a, b in dense_shapes[name])
                total += n + nb
            elif kind == "expert":
                total += n // 2 + n // 32
            elif name == "ffn.gate.weight":
                total += n * 2  # BF16 on disk
            elif name in ("norms", "mtp.norms") or kind == "bf16":
                total += n * 2
            else:
                total += n * {"f32": 4, "i32": 8, "lin16": 2, "keep16": 2}[kind]
    for name, n, kind, _ in globals_(cfg):
        total += n * {"f32": 4, "bf16": 2, "lin16": 2}[kind]
    return total


def n_params(cfg):
    L = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    return sum(p for i in range(L) for _, p, _, _ in tensors(cfg, i)) + sum(
        p for _, p, _, _ in globals_(cfg)
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--hosts", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--context", nargs="+", type=int, default=[131072, 1048576])
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--disk-bytes", action="store_true",
                    help="also print the official checkpoint size the counts imply")  # fmt: skip
    a = ap.parse_args()
    for path in a.configs:
        cfg = json.loads(path.read_text())
        name = path.stem
        print(f"\n{name}: {n_params(cfg) / 1e9:.1f}B parameters (MTP included)")
        if a.disk_bytes:
            print(f"official safetensors from the counts: {official_disk_bytes(cfg):,} bytes")
        for fmt, label in (("official", "official FP8/FP4"), ("mlx4", "MLX 4-bit affine")):
            total = weights_per_host(cfg, fmt, 1, "tensor")
            print(f"{label}: {total / GIB:.1f} GiB of weights on one host")
        head = ["format", "hosts", "TP weights", "TP KV/seq", "PP weights", "PP KV/seq"]
        rows = []
        for fmt, label in (("official", "official FP8/FP4"), ("mlx4", "MLX 4-bit")):
            for n in a.hosts:
                tp = weights_per_host(cfg, fmt, n, "tensor") / GIB
                pp = weights_per_host(cfg, fmt, n, "pipeline") / GIB
                tkv = " / ".join(f"{kv_per_host(cfg, c, n, 'tensor') / GIB:.2f}" for c in a.context)
                pkv = " / ".join(
                    f"{kv_per_host(cfg, c, n, 'pipeline') / GIB:.2f}" for c in a.context
                )
                rows.append([label, str(n), f"{tp:.1f}", tkv, f"{pp:.1f}", pkv])
        ctx = " / ".join(f"{c // 1024}K" for c in a.context)
        print(f"GiB per host; KV per sequence at {ctx} tokens")
        if a.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for r in rows:
                print("| " + " | ".join(r) + " |")
        else:
            w = [max(len(x) for x in col) for col in zip(head, *rows)]
            for r in [head] + rows:
                print("  ".join(x.rjust(k) for x, k in zip(r, w)))


if __name__ == "__main__":
    main()
