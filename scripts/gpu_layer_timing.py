"""Where a randomized layer's time goes on a GPU: one roberta-base-sized linear layer (768 -> 3072),
forward + backward, exact vs each sketch, CUDA-event timing and the number of kernels launched.

    python scripts/gpu_layer_timing.py [--tokens 4096] [--dtype bfloat16]
"""
import argparse

import torch
from torch import nn

from randbp_cli import RandomizedLinear
from randbp_cli.core.sketches import sketch_names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rho", type=float, default=0.1)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    torch.manual_seed(0)
    plain = nn.Linear(768, 3072).to(device, dtype)
    layers = {"exact": plain}
    layers.update({name: RandomizedLinear.from_linear(plain, rho=args.rho, sketch=name) for name in sketch_names()})
    print(f"{'tokens':>7} {'layer':>12} {'ms fwd+bwd':>11} {'× exact':>8} {'kernels':>8}")
    for tokens in args.tokens:
        x = torch.randn(tokens, 768, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, 3072, device=device, dtype=dtype)
        base = None
        for name, layer in layers.items():
            def step():
                layer(x).backward(grad)
            for _ in range(5):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(50):
                step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 50
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
            base = base or ms
            print(f"{tokens:>7} {name:>12} {ms:>11.3f} {ms / base:>8.2f} {kernels:>8}")


if __name__ == "__main__":
    main()
