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
from rvit.engine import mask_ratio_at
from rvit.masking import TokenMasker
from rvit.models import build_model, encoder
from rvit.upernet import segmentation_loss
from rvit.vit import MODELS


def parse_args(argv=None):
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
    p.add_argument("--masks", default="0,0.25,0.5,0.6,0.75,0.85",
                   help="comma-separated ratios; LO-HI draws each step's ratio from U[LO, HI) "
                        "as train.py's --mask-range (its mean step time is reported)")
    p.add_argument("--strategies", default="similarity,dynamic,random,coverage,kmedoids,"
                                            "similarity+merge,kmedoids+merge",
                   help="comma-separated rules: strategies, '+merge' to merge dropped tokens")
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
    args = p.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps, device, warmup=0, deadline=None, sync_each=True):
    """The benchmarks' one timer: `warmup` untimed calls of `step()` (compile included), then
    up to `steps` timed calls. With a `deadline` (a `time.perf_counter()` time) it stops before
    a call that would end past it, judged by the calls so far, so a budget is overrun by at
    most the misjudgement of one call (or by the first warm-up call, whose cost is unknown).

    Args:
        steps: timed calls, or a function (seconds of the last warm-up call, None without
            one) -> timed calls, so a caller can size a run from what one call costs here.
        device: synchronised around each call (CUDA), so a duration is that call's own.
        sync_each: False synchronises only after the last call: durations then overlap (device
            queues, loader prefetch) and only their sum, the run's wall time, is meaningful.

    Returns:
        (warm-up seconds, [seconds per timed call]); the list is empty when the deadline left
        no room for a timed call after the warm-up.
    """
    def late(now, per_call):
        return deadline is not None and now + per_call > deadline

    sync(device)
    start = time.perf_counter()
    last = None
    for _ in range(warmup):
        t = time.perf_counter()
        step()
        sync(device)
        now = time.perf_counter()
        last = now - t
        if late(now, last):
            return now - start, []
    warm = time.perf_counter() - start
    n = steps(last) if callable(steps) else steps
    times, t0 = [], time.perf_counter()
    t = t0
    for i in range(n):
        step()
        now = time.perf_counter()
        stop = i == n - 1 or late(now, (now - t0) / (i + 1))
        if sync_each or stop:
            sync(device)
            now = time.perf_counter()
        times.append(now - t)
        t = now
        if stop:
            break
    return warm, times


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


def measure(model, select, args, device, train, steps=None, deadline=None, varying=False):
    """Training steps or inference forwards on a fixed random batch, timed by `time_steps`
    (`steps` defaults to args.steps; see there for a function and the deadline); `varying`:
    the step changes from call to call (a mask range), so its mean is reported, not its median.

    Returns:
        dict of img_per_s (NaN when no step was timed), step_s (median seconds per step),
        steps (timed), warmup_s (seconds, compile included), peak_mib (CUDA: allocated; CPU:
        resident set of the process).
    """
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
                loss = sum(f.float().mean() for f in model.encode(x, **kwargs)[0])
            else:
                out = model(x, **kwargs)
                out = out if select is None else out[0]  # (output, selection) with a hook
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
    warmup, times = time_steps(train_step if train else infer_step,
                               args.steps if steps is None else steps, device, args.warmup,
                               deadline)
    # a mask range varies the step from call to call: its mean is what an epoch costs
    centre = statistics.mean if varying else statistics.median
    step_s = centre(times) if times else float("nan")
    return {"img_per_s": args.batch_size / step_s, "step_s": step_s, "steps": len(times),
            "warmup_s": warmup, "peak_mib": peak_mib(device)}


def rvit_setting(args, strategy, m, train, steps=None, deadline=None):
    """`measure`'s dict for RViT at one rule (a strategy, "+merge" to merge the dropped tokens)
    and mask ratio, with `kept` (mean kept patch tokens)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = {"model": args.model, "img_size": args.img_size, "patch_size": args.patch_size,
           "out_indices": (3, 5, 7, 11), "decoder_channels": args.decoder_channels,
           "fill": "nearest", "aux": True}
    meta = {"task": args.task, "bands": [None] * args.in_chans, "classes": [None] * args.classes}
    model = build_model(cfg, meta).to(device)
    vit = encoder(model)
    strategy, _, merge = strategy.partition("+")
    masker = TokenMasker(strategy, m if isinstance(m, float) else 0.0, args.patch_size,
                         merge=merge == "merge").to(device)
    select = CountedSelect(masker, None if isinstance(m, float) else m)
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
    # selection runs eagerly under torch.compile, as in train.py
    timed = measure(run, torch.compiler.disable(select) if args.compile else select, args,
                    device, train, steps, deadline, varying=select.mask_range is not None)
    return {**timed, "kept": select.mean_kept}


class CountedSelect:
    """The masker as a `select` hook that counts what it keeps; with `mask_range`, train.py's
    --mask-range draw (a ratio from U[LO, HI) at every call). `mean_kept` averages the kept
    patch tokens per image over the calls."""

    def __init__(self, masker, mask_range=None):
        self.masker, self.mask_range, self.calls, self.kept = masker, mask_range, 0, 0.0

    def __call__(self, z, x, index=None):
        if self.mask_range is not None:
            self.masker.mask_ratio = mask_ratio_at(self.calls, self.mask_range, 0)
        keep = self.masker(z, x, index)
        kept = z.shape[1] if keep is None else float(keep.num_kept.float().mean())
        self.calls, self.kept = self.calls + 1, self.kept + kept
        return keep

    @property
    def mean_kept(self):
        return self.kept / max(self.calls, 1)


def mask_values(text):
    """'0,0.75,0-0.9' -> [0.0, 0.75, (0.0, 0.9)]: ratios, and ranges drawn per step."""
    return [tuple(float(b) for b in v.split("-")) if "-" in v.lstrip("-") else float(v)
            for v in text.split(",")]


def mask_label(m):
    """0.75 -> '0.75'; (0.0, 0.9) -> '0-0.9'."""
    return "-".join(f"{v:g}" for v in m) if isinstance(m, tuple) else f"{m:g}"


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
        for m in mask_values(args.masks):
            if isinstance(m, tuple) and strategy.startswith("dynamic"):
                print(f"  rvit {strategy:<10} mask {mask_label(m):<6} skipped: a range has no "
                      "one dynamic threshold (train.py refuses it too)", flush=True)
                continue
            r = isolated(rvit_setting, args, strategy, m, train)
            rows.append({"impl": "rvit", "strategy": strategy, "mask": m, "ips": r["img_per_s"],
                         "peak": r["peak_mib"], "warmup": r["warmup_s"],
                         "ideal": (1 + n) / (1 + r["kept"])})
            print(f"  rvit {strategy:<10} mask {mask_label(m):<6} {r['img_per_s']:10.0f} img/s  "
                  f"kept {r['kept']:6.1f}/{n}  peak {r['peak_mib']:8.0f} MiB  warm-up "
                  f"{r['warmup_s']:6.1f} s", flush=True)
    return rows


def timm_setting(args, m, train, steps=None, deadline=None):
    """`measure`'s dict for timm's ViT with patch_drop_rate m, with `version` (timm's)."""
    import timm
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(f"{args.model}_patch{args.patch_size}_224", pretrained=False,
                              img_size=args.img_size, in_chans=args.in_chans,
                              num_classes=args.classes, patch_drop_rate=m).to(device)
    run = torch.compile(model) if args.compile else model
    return {**measure(run, None, args, device, train, steps, deadline),
            "version": timm.__version__}


def timm_runs(args, train):
    rows = []
    for m in (v for v in mask_values(args.masks) if isinstance(v, float)):  # no ranges
        r = isolated(timm_setting, args, m, train)
        rows.append({"impl": f"timm {r['version']}", "strategy": "patch_drop", "mask": m,
                     "ips": r["img_per_s"], "peak": r["peak_mib"], "warmup": r["warmup_s"],
                     "ideal": float("nan")})
        print(f"  timm patch_drop mask {m:<5} {r['img_per_s']:10.0f} img/s  peak "
              f"{r['peak_mib']:8.0f} MiB  warm-up {r['warmup_s']:6.1f} s", flush=True)
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
        print(f"| {mode} | {r['impl']} | {r['strategy']} | {mask_label(r['mask'])} | {ips} | "
              f"{up} | {ideal} | {r['peak']:,.0f} | {r['warmup']:.1f} |")


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
