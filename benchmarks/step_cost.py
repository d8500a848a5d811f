"""Per-step cost of NFT mask training vs. full-weight fine-tuning, same model and batch.

Prints one table row per (model, method): median step time, the ratio to full fine-tuning measured side by
side (steps of all methods are interleaved, so machine noise hits them alike), the bytes autograd saves for
the backward pass plus the gradient bytes, and on CUDA the peak allocated memory.

    .venv/bin/python benchmarks/step_cost.py                      # CPU (and CUDA when present)
    .venv/bin/python benchmarks/step_cost.py --models small_cnn --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nft_core.masks import attach_masks, clamp_masks, mask_l1_distance, mask_parameters
from nft_core.models import Normalized, build_model
from nft_core.purify import set_norm_mode

METHODS = ("full_ft", "nft_norm", "nft_weight")


def _setup(builder: str, width: int, method: str, device: torch.device, x: torch.Tensor):
    torch.manual_seed(0)
    model = Normalized(build_model(builder, num_classes=10, width=width), [0.5] * 3, [0.25] * 3).to(device)
    if method == "full_ft":
        params = list(model.parameters())
        model.train()
        bounds = None
    else:
        layers = attach_masks(model, method.removeprefix("nft_"), x[:1])
        params = mask_parameters(model)
        set_norm_mode(model, "train")
        bounds = [0.0] * len(layers)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return model, params, opt, bounds


def _step(model: nn.Module, opt, bounds, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    if bounds is not None:
        loss = loss + 1e-5 * mask_l1_distance(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if bounds is not None:
        clamp_masks(model, bounds)


def _saved_bytes(model, params, x, y) -> int:
    """Bytes autograd keeps for backward (activations) plus the gradients of the trained parameters."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = sum(p.numel() * p.element_size() for p in params)
    model.zero_grad(set_to_none=True)
    return total + grads


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def bench(builder: str, width: int, device: torch.device, batch: int, reps: int) -> list[dict]:
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    setups = {m: _setup(builder, width, m, device, x) for m in METHODS}
    sync = _sync(device)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for m, (model, _, opt, bounds) in setups.items():  # warm-up
        _step(model, opt, bounds, x, y)
    for _ in range(reps):
        for m, (model, _, opt, bounds) in setups.items():
            sync()
            t0 = time.perf_counter()
            _step(model, opt, bounds, x, y)
            sync()
            times[m].append(time.perf_counter() - t0)
    rows = []
    for m, (model, params, opt, bounds) in setups.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            _step(model, opt, bounds, x, y)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append({"model": f"{builder}(w={width})", "device": str(device), "method": m,
                     "trained": sum(p.numel() for p in params), "step_ms": 1e3 * statistics.median(times[m]),
                     "saved_mib": _saved_bytes(model, params, x, y) / 2**20, "peak_mib": peak})
    base = next(r for r in rows if r["method"] == "full_ft")
    for r in rows:
        r["time_ratio"] = r["step_ms"] / base["step_ms"]
        r["saved_ratio"] = r["saved_mib"] / base["saved_mib"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small_cnn:32", "preact_resnet18:64"],
                        help="builder:width pairs")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.reps} interleaved reps")
    print("| model | device | method | trained params | step ms (median) | time vs full FT | saved+grad MiB | vs full FT | CUDA peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for device in devices:
        for spec in args.models:
            builder, width = spec.split(":")
            for r in bench(builder, int(width), device, args.batch, args.reps):
                peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
                print(f"| {r['model']} | {r['device']} | {r['method']} | {r['trained']:,} | {r['step_ms']:.1f} | "
                      f"{r['time_ratio']:.2f} | {r['saved_mib']:.1f} | {r['saved_ratio']:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
