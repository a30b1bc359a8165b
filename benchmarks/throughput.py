"""Training and inference throughput of RViT at several mask ratios, on batches already on device.

    python -m benchmarks.throughput --masks 0,0.6,0.85 --strategies similarity --batch-size 256
    python -m benchmarks.throughput --compile --timm          # add timm's patch_drop_rate

For each strategy and mask ratio: images/s (median of timed steps after warm-up), speed-up over
the same strategy at mask 0, the token-count ideal (1 + N) / (1 + K), peak memory (CUDA:
allocated; CPU: the peak resident set of a fresh process per setting, model and Python
included) and the warm-up's seconds (with --compile, mostly compile time). Prints the device,
torch version and settings first and a Markdown table last. Timings are figures to read, not
tests: nothing here asserts a speed.
"""
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from rvit.cli import parser
from rvit.masking import TokenMasker
from rvit.models import build_model, encoder
from rvit.upernet import segmentation_loss
from rvit.vit import MODELS


def parse_args():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny", choices=sorted(MODELS), help="ViT size")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels")
    p.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    p.add_argument("--in-chans", type=int, default=3, help="input bands")
    p.add_argument("--classes", type=int, default=19, help="classes")
    p.add_argument("--task", choices=("multilabel", "segmentation"), default="multilabel",
                   help="ViT classifier, or RUPerNet (nearest fill, auxiliary head)")
    p.add_argument("--decoder-channels", type=int, default=64, help="RUPerNet UPerHead width")
    p.add_argument("--encoder-only", action="store_true",
                   help="segmentation: time RUPerNet's encoder alone (tapped blocks, grid "
                        "restored), to see the decoder's share of a step")
    p.add_argument("--masks", default="0,0.25,0.5,0.6,0.75,0.85", help="comma-separated ratios")
    p.add_argument("--strategies", default="similarity,dynamic,random,coverage",
                   help="comma-separated strategies")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both",
                   help="time training steps, inference forwards, or both")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (and compile)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast precision; default bf16 on CUDA, none (fp32) on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--timm", action="store_true",
                   help="also time timm's VisionTransformer with patch_drop_rate (random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cuda when available)")
    args = p.parse_args()
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, args, device):
    """(median seconds per call of `step` after warm-up, seconds the warm-up took, compile
    included)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), warmup


def reset_peak(device):
    """Start a new peak-memory window: CUDA allocator stats, or on Linux CPUs the process's
    resident-set high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mib(device):
    """Peak CUDA memory allocated, or peak resident set of this process on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return float("nan")


def measure(model, select, args, device, train):
    """(images/s, peak MiB, warm-up s) of training steps or inference forwards on a fixed
    random batch."""
    B, S = args.batch_size, args.img_size
    x = torch.randn(B, args.in_chans, S, S, device=device)
    seg = args.task == "segmentation"
    y = torch.randint(0, args.classes, (B, S, S), device=device) if seg else \
        (torch.rand(B, args.classes, device=device) < 0.2).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    kwargs = {} if select is None else {"select": select}

    def train_step():
        with amp:
            if args.encoder_only:  # RUPerNet's ViT alone: the rest of a full step is decoder
                loss = sum(f.float().mean() for f in model.encode(x, **kwargs))
            else:
                out = model(x, **kwargs)
                loss = segmentation_loss(out, y) if seg else \
                    F.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_step():
        with amp:
            model.encode(x, **kwargs) if args.encoder_only else model(x, **kwargs)

    model.train(train)
    reset_peak(device)
    seconds, warmup = time_steps(train_step if train else infer_step, args, device)
    return args.batch_size / seconds, peak_mib(device), warmup


def rvit_setting(args, strategy, m, train):
    """(images/s, peak MiB, warm-up s, mean kept tokens) of RViT at one strategy and mask ratio."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = {"model": args.model, "img_size": args.img_size, "patch_size": args.patch_size,
           "out_indices": (3, 5, 7, 11), "decoder_channels": args.decoder_channels,
           "fill": "nearest", "aux": True}
    meta = {"task": args.task, "bands": [None] * args.in_chans, "classes": [None] * args.classes}
    model = build_model(cfg, meta).to(device)
    vit = encoder(model)
    masker = TokenMasker(strategy, m, args.patch_size).to(device)
    if strategy == "dynamic" and m > 0:  # calibrate tau before any timing
        with torch.no_grad():
            for _ in range(20):
                vit.embed(torch.randn(64, args.in_chans, args.img_size, args.img_size,
                                        device=device), masker)
    masker.train(train)
    if args.encoder_only and args.task != "segmentation":
        raise SystemExit("--encoder-only needs --task segmentation")
    run = torch.compile(model) if args.compile else model
    if args.compile and args.encoder_only:
        run.encode = torch.compile(model.encode)
    return (*measure(run, masker, args, device, train), float(masker.num_kept.float().mean()))


def isolated(fn, *args):
    """Run fn in a fresh process on CPU, so each setting's peak resident set is its own."""
    if args[0].device != "cpu":
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def rvit_runs(args, train):
    rows = []
    n = (args.img_size // args.patch_size) ** 2
    for strategy in args.strategies.split(","):
        for m in (float(v) for v in args.masks.split(",")):
            ips, peak, warmup, kept = isolated(rvit_setting, args, strategy, m, train)
            rows.append({"impl": "rvit", "strategy": strategy, "mask": m, "ips": ips,
                         "peak": peak, "warmup": warmup, "ideal": (1 + n) / (1 + kept)})
            print(f"  rvit {strategy:<10} mask {m:<5} {ips:10.0f} img/s  kept {kept:6.1f}/{n}"
                  f"  peak {peak:8.0f} MiB  warm-up {warmup:6.1f} s", flush=True)
    return rows


def timm_setting(args, m, train):
    """(images/s, peak MiB, warm-up s, timm version) of timm's ViT with patch_drop_rate m."""
    import timm
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(f"{args.model}_patch{args.patch_size}_224", pretrained=False,
                              img_size=args.img_size, in_chans=args.in_chans,
                              num_classes=args.classes, patch_drop_rate=m).to(device)
    run = torch.compile(model) if args.compile else model
    return (*measure(run, None, args, device, train), timm.__version__)


def timm_runs(args, train):
    rows = []
    for m in (float(v) for v in args.masks.split(",")):
        ips, peak, warmup, version = isolated(timm_setting, args, m, train)
        rows.append({"impl": f"timm {version}", "strategy": "patch_drop", "mask": m,
                     "ips": ips, "peak": peak, "warmup": warmup, "ideal": float("nan")})
        print(f"  timm patch_drop mask {m:<5} {ips:10.0f} img/s  peak {peak:8.0f} MiB"
              f"  warm-up {warmup:6.1f} s", flush=True)
    return rows


def table(rows, mode):
    print("\n| mode | impl | strategy | mask | images/s | speed-up vs mask 0 | token ideal "
          "| peak MiB | warm-up s |\n|---|---|---|---|---|---|---|---|---|")
    base = {(r["impl"], r["strategy"]): r["ips"] for r in rows if r["mask"] == 0}
    for r in rows:
        b = base.get((r["impl"], r["strategy"]))
        up = f"{r['ips'] / b:.2f}x" if b else "n/a"
        ideal = "" if r["ideal"] != r["ideal"] else f"{r['ideal']:.2f}x"
        ips = f"{r['ips']:,.{0 if r['ips'] >= 100 else 1}f}"
        print(f"| {mode} | {r['impl']} | {r['strategy']} | {r['mask']:g} | {ips} | {up} | "
              f"{ideal} | {r['peak']:,.0f} | {r['warmup']:.1f} |")


def main():
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = args.model + ("+UPerNet" if args.task == "segmentation" else "")
    print(f"device {name}, torch {torch.__version__}, {model}/{args.patch_size} at "
          f"{args.img_size} px, batch {args.batch_size}, amp {args.amp}, "
          f"{'compiled' if args.compile else 'eager'}, {args.steps} timed steps after "
          f"{args.warmup} warm-up", flush=True)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    results = {}
    for mode in modes:
        print(f"{mode}:", flush=True)
        rows = rvit_runs(args, mode == "train")
        if args.timm and args.task == "multilabel":
            rows += timm_runs(args, mode == "train")
        results[mode] = rows
    for mode, rows in results.items():
        table(rows, mode)


if __name__ == "__main__":
    main()
