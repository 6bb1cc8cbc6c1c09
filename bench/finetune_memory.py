"""Peak memory of full fine-tuning versus LoRA on the same model and batch.

Each variant runs in its own fresh process (the allocator keeps freed memory) and trains
a few AdamW steps of the repository's Llama: full = every weight trains (gradients and
two Adam moments for all of them); lora = the base frozen, adapters on every linear of
every block (pretrain/lora.py). On CPU the figure is the process's peak RSS (VmHWM), on
CUDA torch.cuda.max_memory_allocated; the weights' own size is printed for reference.
The last line is machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(a) -> None:
    import torch
    import torch.nn.functional as F

    from pretrain.lora import apply_lora, init_lora
    from pretrain.model.llama import FAMILY
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.model.llama import build_llama, seeded_trunc_normal_
    from pretrain.optim import build_optimizer

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.gpu else "cpu")
    args = LlamaArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, n_kv_heads=max(1, a.dim // 256),
                     ffn_hidden_dim=int(a.dim * 3.5) // 64 * 64, vocab_size=a.vocab)
    model = build_llama(args, rope_cache_len=a.seq, device=device)
    model.init_weights(seed=0)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if a.variant == "lora":
        apply_lora(model, FAMILY, rank=a.rank, alpha=2 * a.rank, dropout=0.0, targets=["all"])
        init_lora(model, lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 0))

    class Cfg:
        lr, betas, eps, weight_decay = 1e-4, (0.9, 0.95), 1e-8, 0.0

    opt = build_optimizer(model, Cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if a.gpu else _hwm_mb()
    print(json.dumps({"peak_mb": peak, "weights_mb": weights_mb, "trainable": trainable,
                      "params": sum(p.numel() for p in model.parameters()),
                      "step_s": sorted(times[1:])[len(times[1:]) // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        return child(a)
    res = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    f, lo = res["full"], res["lora"]
    print(f"model: {f['params'] / 1e6:.1f}M parameters ({f['weights_mb']:.0f} MB fp32), batch {a.batch} x seq {a.seq}, "
          f"{'CUDA max allocated' if a.gpu else 'peak RSS'}")
    print(f"{'variant':<8} {'trainable':>12} {'peak MB':>9} {'step s':>7}")
    for name, r in res.items():
        print(f"{name:<8} {r['trainable']:>12,} {r['peak_mb']:>9.0f} {r['step_s']:>7.2f}")
    ratio = lo["peak_mb"] / f["peak_mb"]
    print(f"LoRA peak / full peak: {ratio:.2f}")
    print(f"params_m={f['params'] / 1e6:.1f} full_peak_mb={f['peak_mb']:.0f} lora_peak_mb={lo['peak_mb']:.0f} "
          f"lora_trainable={lo['trainable']} peak_ratio={ratio:.3f} full_step_s={f['step_s']:.2f} "
          f"lora_step_s={lo['step_s']:.2f}")


if __name__ == "__main__":
    main()
