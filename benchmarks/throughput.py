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
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks.environment import device_name, timm_version
from benchmarks.timing import (add_speedups, cell, device_parser, markdown, part_status,
                               peak_mib, reset_peak, run_settings, sig, time_steps)
from rvit.engine import autocast, mask_ratio_at
from rvit.masking import STRATEGIES, TokenMasker, num_keep
from rvit.models import build_model, encoder
from rvit.upernet import segmentation_loss
from rvit.vit import MODELS


def parse_args(argv=None):
    p = device_parser(__doc__)
    p.add_argument("--model", default="vit_tiny", choices=sorted(MODELS), help="ViT size")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
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
    args = p.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    return args


def training_step(model, select, amp, device, encoder_only=False):
    """step(x, y): one AdamW step (lr 1e-4) of `model` with the `select` hook (None: none)
    under autocast to `amp` ("bf16", "fp16" or "none"). Loss: pixel cross-entropy (RUPerNet's
    auxiliary head included) for (B, H, W) targets, binary cross-entropy for (B, K) ones;
    `encoder_only`: the mean of RUPerNet's encoder features (the decoder left out)."""
    ctx, kwargs = autocast(device, amp), {} if select is None else {"select": select}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(x, y):
        with ctx:
            if encoder_only:
                loss = sum(f.float().mean() for f in model.encode(x, **kwargs)[0])
            else:
                out = model(x, **kwargs)
                out = out if select is None else out[0]  # (output, selection) with a hook
                loss = segmentation_loss(out, y) if y.dim() == 3 else \
                    F.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


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
    y = torch.randint(0, args.classes, (B, S, S), device=device) if args.task == \
        "segmentation" else (torch.rand(B, args.classes, device=device) < 0.2).float()
    train_step = training_step(model, select, args.amp, device, args.encoder_only)
    ctx, kwargs = autocast(device, args.amp), {} if select is None else {"select": select}

    @torch.no_grad()
    def infer_step():
        with ctx:
            model.encode(x, **kwargs) if args.encoder_only else model(x, **kwargs)

    model.train(train)
    reset_peak(device)
    warmup, times = time_steps(lambda: train_step(x, y) if train else infer_step(),
                               args.steps if steps is None else steps, device, args.warmup,
                               deadline)
    # a mask range varies the step from call to call: its mean is what an epoch costs
    centre = statistics.mean if varying else statistics.median
    step_s = centre(times) if times else float("nan")
    return {"img_per_s": args.batch_size / step_s, "step_s": step_s, "steps": len(times),
            "warmup_s": warmup, "peak_mib": peak_mib(device)}


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
        # a device tensor, read once at the end: a read per call would sync the GPU mid-step
        kept = z.shape[1] if keep is None else keep.num_kept.float().mean()
        self.calls, self.kept = self.calls + 1, self.kept + kept
        return keep

    @property
    def mean_kept(self):
        return float(self.kept) / max(self.calls, 1)


def rvit_model(args, rule, m, train, device):
    """(RViT model, CountedSelect) for a rule (a strategy, "+merge" to merge the dropped
    tokens) at mask ratio m, or a (lo, hi) range drawn per step; the dynamic threshold is
    calibrated before any timing."""
    cfg = {"model": args.model, "img_size": args.img_size, "patch_size": args.patch_size,
           "out_indices": (3, 5, 7, 11), "decoder_channels": args.decoder_channels,
           "fill": "nearest", "aux": True}
    meta = {"task": args.task, "bands": [None] * args.in_chans, "classes": [None] * args.classes}
    model = build_model(cfg, meta).to(device)
    strategy, _, merge = rule.partition("+")
    masker = TokenMasker(strategy, m if isinstance(m, float) else 0.0, args.patch_size,
                         merge=merge == "merge").to(device)
    if strategy == "dynamic" and m > 0:
        with torch.no_grad():
            for _ in range(20):
                encoder(model).embed(torch.randn(64, args.in_chans, args.img_size,
                                                 args.img_size, device=device), masker)
    masker.train(train)
    return model, CountedSelect(masker, None if isinstance(m, float) else m)


def setting(args, rule, m, train, steps=None, deadline=None):
    """`measure`'s dict for one rule at mask ratio m: an RViT rule (see rvit_model), with
    `kept` (mean kept patch tokens per image); or "timm", timm's VisionTransformer with
    patch_drop_rate m, with `version` (timm's). `steps` and `deadline` as in `measure`.

    Raises:
        SystemExit: --encoder-only without --task segmentation.
    """
    if args.encoder_only and args.task != "segmentation":
        raise SystemExit("--encoder-only needs --task segmentation")
    device = torch.device(args.device)
    torch.manual_seed(0)
    if rule == "timm":
        import timm
        model, select = timm.create_model(
            f"{args.model}_patch{args.patch_size}_224", pretrained=False, img_size=args.img_size,
            in_chans=args.in_chans, num_classes=args.classes, patch_drop_rate=m).to(device), None
    else:
        model, select = rvit_model(args, rule, m, train, device)
    run = torch.compile(model) if args.compile else model
    if args.compile and args.encoder_only:
        run.encode = torch.compile(model.encode)
    # selection runs eagerly under torch.compile, as in train.py
    hook = torch.compiler.disable(select) if args.compile and select else select
    r = measure(run, hook, args, device, train, steps, deadline, varying=isinstance(m, tuple))
    return {**r, "version": timm.__version__} if rule == "timm" else \
        {**r, "kept": select.mean_kept}


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
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def row(r, n, peak=True):
    """`setting`'s dict as a report row: img_per_s (4 significant figures), steps, warmup_s,
    peak_mib (None without `peak`), and for RViT kept_tokens and token_ideal, (1 + N) / (1 + K)
    for N patch tokens."""
    out = {"img_per_s": sig(r["img_per_s"]), "steps": r["steps"],
           "warmup_s": round(r["warmup_s"], 1),
           "peak_mib": round(r["peak_mib"]) if peak and r["peak_mib"] == r["peak_mib"] else None}
    if "kept" in r:
        out.update(kept_tokens=round(r["kept"], 1), token_ideal=round((1 + n) / (1 + r["kept"]), 2))
    return out


def runs(args, mode):
    """One row per rule and mask ratio (timm's after RViT's with --timm), printed as it ends."""
    rows, n = [], (args.img_size // args.patch_size) ** 2
    timm = args.timm and args.task == "multilabel"
    for rule in args.strategies.split(",") + (["timm"] if timm else []):
        for m in mask_values(args.masks):
            label = f"{'timm patch_drop' if rule == 'timm' else 'rvit ' + rule:<15} mask " \
                    f"{mask_label(m):<6}"
            if isinstance(m, tuple) and rule == "timm":  # timm has no per-step ratio
                continue
            if isinstance(m, tuple) and rule.startswith("dynamic"):
                print(f"  {label} skipped: a range has no one dynamic threshold (train.py "
                      "refuses it too)", flush=True)
                continue
            r = isolated(setting, args, rule, m, mode == "train")
            rows.append({"mode": mode, "impl": f"timm {r['version']}" if rule == "timm"
                         else "rvit", "strategy": "patch_drop" if rule == "timm" else rule,
                         "mask": m, **row(r, n)})
            print(f"  {label} {r['img_per_s']:10.0f} img/s  " + (f"kept {r['kept']:6.1f}/{n}  "
                  if rule != "timm" else "") + f"peak {r['peak_mib']:8.0f} MiB  warm-up "
                  f"{r['warmup_s']:6.1f} s", flush=True)
    return add_speedups(rows, "img_per_s", ("impl", "strategy"), "mask", 0.0)


def table(rows):
    """(header, cells) of `runs`'s rows."""
    return ["mode", "impl", "strategy", "mask", "images/s (speed-up vs mask 0)", "token ideal",
            "peak MiB", "warm-up s"], [
        [r["mode"], r["impl"], r["strategy"], mask_label(r["mask"]),
         cell(r, "img_per_s", "speedup"),
         f"{r['token_ideal']:.2f}x" if r.get("token_ideal") else "",
         "" if r["peak_mib"] is None else f"{r['peak_mib']:,}", r["warmup_s"]] for r in rows]


# The suite's part (benchmarks.suite): the settings most important first, within a deadline.
SUITE_MASKS = (0.0, 0.75, 0.6)  # run order: the baseline, the headline ratio, the other one
COMPILE_S = 60.0  # assumed seconds of a compiled setting until one is measured: a compile
# cannot be stopped, so a late one must not start
Setting = namedtuple("Setting", "mode batch run impl strategy mask")


def suite_settings(sizes, strategies, timm):
    """The settings, most important first, in four tiers: eager runs of the first strategy
    (and timm); compiled training of those at the largest batch; eager runs of the other
    strategies; every other compiled run. Within a tier: the larger batch, training, then
    inference; RViT's mask-0 baseline (the plain ViT whatever the strategy, so timed once),
    then the masks in SUITE_MASKS order, timm after RViT."""
    models = [("rvit", "none", 0.0)] + [("rvit", s, m) for m in SUITE_MASKS[1:]
                                        for s in strategies]
    models += [("timm", "patch_drop", m) for m in SUITE_MASKS if timm]
    out = [Setting(mode, batch, run, *model) for run in sizes["runs"]
           for batch in sizes["batches"] for mode in ("train", "infer") for model in models]

    def tier(st):
        lead = st.strategy in ("none", "patch_drop", strategies[0])
        if st.run == "eager":
            return 0 if lead else 2
        return 1 if lead and st.batch == max(sizes["batches"]) and st.mode == "train" else 3
    return sorted(out, key=tier)  # stable: the order above within a tier


def suite_part(suite, deadline):
    """The suite's record of `suite_settings` on batches already on the device."""
    sizes, timm = suite.sizes, timm_version()
    # the paper's rule first; merging timed with the rule that pairs with it best
    strategies = sorted(STRATEGIES, key=lambda s: s != "similarity") + ["kmedoids+merge"]
    settings = suite_settings(sizes, strategies, timm)
    warmup, n = sizes["warmup"], (sizes["img"] // 16) ** 2
    for st in settings:  # a compile's cost is a guess until one is measured
        if st.run == "compiled":
            suite.costs.setdefault(("throughput", st.mode, st.batch, st.run), COMPILE_S)

    def measure(st, steps, deadline):
        args = parse_args(["--batch-size", str(st.batch), "--img-size", str(sizes["img"]),
                           "--warmup", str(warmup), "--device", suite.args.device]
                          + (["--compile"] if st.run == "compiled" else []))
        rule = {"none": "similarity", "patch_drop": "timm"}.get(st.strategy, st.strategy)
        return setting(args, rule, st.mask, st.mode == "train", steps, deadline)

    results = run_settings(settings, measure, deadline, *sizes["steps"], suite.costs,
                           kind=lambda st: ("throughput", st.mode, st.batch, st.run))
    rows = [{**st._asdict(), "status": r["status"], **(row(r, n, suite.device.type == "cuda")
                                                        if r["status"] == "ok" else {})}
            for st, r in zip(settings, results)]
    add_speedups(rows, "img_per_s", ("impl", "mode", "batch", "run"), "mask", 0.0)
    ideal = ", ".join(f"{(1 + n) / (1 + num_keep(n, m)):.2f}x at mask {m:g}"
                      for m in sorted(SUITE_MASKS) if m)
    notes = [f"RViT at mask 0 runs the plain ViT whatever the strategy: timed once per mode, "
             f"batch and run; every RViT speed-up is over that row. Token-count ideal "
             f"(1 + N) / (1 + K), N = {n}: {ideal}",
             f"timm {timm}: `patch_drop_rate` drops random patches in training only" if timm
             else "timm rows skipped: timm not installed",
             "compiled rows skipped: CUDA only (compiling on a CPU would spend the budget); "
             "peak memory: CUDA only" if suite.device.type != "cuda" else
             f"a compiled setting was assumed to take {COMPILE_S:g} s until one of its kind "
             f"was measured; peak memory: CUDA allocator, per setting"]
    return {"rows": rows, "table": suite_table(rows, strategies), "notes": notes,
            "status": part_status(rows),
            "caption": f"ViT-tiny/16 at {sizes['img']} px, 3 bands, 19 classes, AMP "
                       f"{suite.amp}, batches already on the device; img/s = batch / median "
                       f"step of the timed steps (after {warmup} warm-up); in brackets the "
                       f"speed-up over mask 0 of the same model, mode, batch and run."}


def suite_table(rows, strategies):
    """One line per mode, batch, run and model; a column per mask."""
    order, masks = ["none"] + strategies + ["patch_drop"], sorted(SUITE_MASKS)
    groups = {}
    for r in sorted(rows, key=lambda r: (r["mode"] != "train", r["run"] != "eager", -r["batch"],
                                         order.index(r["strategy"]))):
        groups.setdefault((r["mode"], r["batch"], r["run"], r["strategy"]), {})[r["mask"]] = r
    names = {"none": "RViT, no token dropped (any strategy)",
             "patch_drop": "timm `patch_drop_rate`"}
    return ["mode", "batch", "run", "model"] + [f"mask {m:g}" for m in masks], [
        [mode, batch, run, names.get(strategy, f"RViT {strategy}")] + [
            cell(by_mask.get(m), "img_per_s", m and "speedup") for m in masks]
        for (mode, batch, run, strategy), by_mask in groups.items()]


def main():
    args = parse_args()
    device = torch.device(args.device)
    model = args.model + ("+UPerNet" if args.task == "segmentation" else "")
    print(f"{device_name(device)}, torch {torch.__version__}, {model}/{args.patch_size} at "
          f"{args.img_size} px, batch {args.batch_size}, amp {args.amp}, "
          f"{'compiled' if args.compile else 'eager'}, {args.steps} timed steps after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    for mode in ("train", "infer") if args.mode == "both" else (args.mode,):
        print(f"{mode}:", flush=True)
        rows += runs(args, mode)
    print("\n" + "\n".join(markdown(*table(rows))))


if __name__ == "__main__":
    main()
