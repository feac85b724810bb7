#!/usr/bin/env python
"""
The project's GPU check (issue 17, item 9): what only a CUDA device shows, in one run of a
few minutes, no downloads. Run it through ``bash tools/gpu_check.sh`` on a machine with a
GPU (it installs the carried wheels first); it prints Markdown tables and writes them to
``--out``/gpu_check.md.

Sections (``--sections``, default all):

- ``losses``: every RoI classification loss and every dense loss, forward+backward on
  CUDA (``--smoke``: the CPU under the GPU policy) in float32 and under AMP (float16 logits inside ``torch.autocast``), against the
  same loss on the CPU in float32 on the same values: relative error of the value, of the
  gradient (max |Δ| / max |g|) and of the method state after the step (max |Δ| / max |s|
  over the loss's buffers), and whether the gradient keeps the logits' dtype.
- ``train``: ``--iters`` training iterations of each method on its quickstart config with
  ``SOLVER.AMP.ENABLED True``: seconds per iteration (median of the iterations after the
  first 10, each timed to a device synchronization), peak GPU memory
  (``torch.cuda.max_memory_allocated``), the first and last total loss.
- ``dense``: the peak extra GPU memory of one forward+backward of the dense losses at
  LVIS RetinaNet size (anchors of ``--dense-images`` images at 1333x800, 9 anchors per
  location on P3-P7, x 1203 classes), in float32 copies of the logits, against fvcore's
  focal loss through autograd; and its time.
- ``fixed_ap``: ``benchmarks/bench_fixed_ap.py --device cuda`` (Fixed-AP inference, no per-image
  cap) at 300 and 3000 detections per image: peak GPU and host memory, time per image.

``--smoke`` runs every section on the CPU at toy sizes (what ``tests/test_gpu_check.py``
does in CI, so the script does not rot where no GPU ever runs it).
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

TOLERANCE = {"fp32": 1e-4, "amp": 2e-2}  # relative, on value / gradient / state


def _registry_names(registry):
    """Names in a registry: a dict (name -> class) or Detectron2's ``Registry``."""
    if isinstance(registry, dict):
        return sorted(registry)
    return sorted(name for name, _ in registry)


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _buffers(loss):
    return {k: v for k, v in loss.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


# -- losses ----------------------------------------------------------------------------------
def _roi_problem(num_rois, num_classes, seed=0):
    from bench_losses import image_batch_labels, lvis_like_stats

    g = torch.Generator().manual_seed(seed)
    stats = lvis_like_stats(num_classes, g)
    labels, instance_ids = image_batch_labels(num_rois, num_classes, stats, g)
    return stats, labels, instance_ids, g


@contextlib.contextmanager
def same_draws(seed=1):
    """The losses' random draws (Federated's ``torch.multinomial``, DropLoss's
    :func:`exceeds_uniform`, BAGS's :func:`uniform_keys`) made on the CPU from one seeded generator and moved to the
    device, so that a CUDA step and its CPU reference draw the same numbers and can be
    compared to rounding."""
    from eqlosses_d2.losses import bags, gumbel

    generator = torch.Generator().manual_seed(seed)
    multinomial, exceeds, keys = torch.multinomial, gumbel.exceeds_uniform, bags.uniform_keys

    def cpu_multinomial(input, num_samples, replacement=False, *, generator_=None, **kwargs):
        return multinomial(input.detach().float().cpu(), num_samples, replacement, generator=generator).to(input.device)

    def cpu_exceeds(rows, cols, threshold, device):
        return (torch.rand(rows, cols, generator=generator) > float(threshold)).to(device)

    def cpu_keys(rows, cols, device):
        return torch.rand(rows, cols, generator=generator).to(device)

    torch.multinomial, gumbel.exceeds_uniform, bags.uniform_keys = cpu_multinomial, cpu_exceeds, cpu_keys
    try:
        yield
    finally:
        torch.multinomial, gumbel.exceeds_uniform, bags.uniform_keys = multinomial, exceeds, keys


@contextlib.contextmanager
def forced_gpu_policy(enabled):
    """On the CPU (``--smoke``) the compared step runs under the GPU policy (bounded large
    chunks, no host reads), so the smoke run compares the two code paths."""
    from eqlosses_d2.losses import base

    before = base.DEVICE_POLICY
    base.DEVICE_POLICY = "gpu" if enabled else before
    try:
        yield
    finally:
        base.DEVICE_POLICY = before


def _logits(loss, rows, cols, generator):
    """Logits around the loss's initial classifier bias (Gumbel's −2: the clamped loss
    saturates at 20 on zero-centred logits, with no gradient to compare)."""
    logits = torch.randn(rows, cols, generator=generator)
    bias = loss.classifier_bias_init() if hasattr(loss, "classifier_bias_init") else None
    return logits if bias is None else logits + bias.float()


def _roi_step(loss, logits, labels, instance_ids, num_classes, amp):
    from eqlosses_d2.losses.equilibrium import instance_mean_scores

    x = logits.detach().clone().requires_grad_()
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    with autocast:
        context = {"progress": 1.0}
        if getattr(loss, "needs_instance_scores", False):
            context["instance_labels"], context["instance_means"] = instance_mean_scores(
                x, labels, instance_ids, num_classes)
        value = sum(loss(x, labels, **context).values())
    value.backward()
    return value.detach(), x.grad


def _dense_step(loss, logits, labels, amp):
    x = logits.detach().clone().requires_grad_()
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    with autocast:
        value = sum(loss(x, labels, normalizer=max(1.0, float((labels < loss.num_classes).sum()))).values())
    value.backward()
    return value.detach(), x.grad


def check_losses(device, smoke, size=None):
    from eqlosses_d2 import losses as L

    num_rois, num_classes = size or ((8192, 64) if smoke else (4096, 1203))
    stats, labels, instance_ids, g = _roi_problem(num_rois, num_classes)
    rows = []
    cases = [("roi", n) for n in _registry_names(L.LOSS_REGISTRY)]
    cases += [("dense", n) for n in _registry_names(L.DENSE_LOSS_REGISTRY)]
    for kind, name in cases:
        try:
            if kind == "roi":
                loss = L.build_loss(name, num_classes, class_stats=stats)
                logits = _logits(loss, num_rois, loss.num_logits, g)
                if name == "pcb":  # its active phase: past START and every class seen
                    loss.instance_count.fill_(1.0)
                    loss.confusion.copy_(torch.softmax(torch.randn(num_classes, num_classes, generator=g), dim=1))
                d_labels = labels
            else:
                loss = L.build_dense_loss(name, num_classes, class_stats=stats)
                logits = torch.randn(num_rois * 4, num_classes, generator=g) * 2.0 - 4.0
                d_labels = torch.full((num_rois * 4,), num_classes, dtype=torch.long)
                positive = torch.rand(num_rois * 4, generator=g) < 0.05
                d_labels[positive] = torch.randint(0, num_classes, (int(positive.sum()),), generator=g)
            loss.train()
            for precision in ("fp32", "amp"):
                if precision == "amp" and device.type != "cuda":
                    continue
                reference, moved = copy.deepcopy(loss), copy.deepcopy(loss).to(device)
                x = logits.half().float() if precision == "amp" else logits  # the values AMP's logits hold
                x_dev = x.to(device, torch.float16 if precision == "amp" else torch.float32)
                with same_draws():
                    if kind == "roi":
                        v_ref, g_ref = _roi_step(reference, x, d_labels, instance_ids, num_classes, amp=False)
                    else:
                        v_ref, g_ref = _dense_step(reference, x, d_labels, amp=False)
                with same_draws(), forced_gpu_policy(device.type == "cpu"):
                    if kind == "roi":
                        v, grad = _roi_step(moved, x_dev, d_labels.to(device), instance_ids.to(device), num_classes,
                                            amp=precision == "amp")
                    else:
                        v, grad = _dense_step(moved, x_dev, d_labels.to(device), amp=precision == "amp")
                buffers_ref, buffers = _buffers(reference), _buffers(moved)
                state = max([_rel(buffers[k], buffers_ref[k]) for k in buffers_ref] or [0.0])
                errors = (_rel(v, v_ref), _rel(grad, g_ref), state)
                finite = bool(torch.isfinite(v).item()) and bool(torch.isfinite(grad).all().item())
                ok = finite and max(errors) <= TOLERANCE[precision] and grad.dtype == x_dev.dtype
                rows.append(f"| {name} | {precision} | {v.item():.6g} | {errors[0]:.1e} | {errors[1]:.1e} | "
                            f"{errors[2]:.1e} | {str(grad.dtype).replace('torch.', '')} | {'ok' if ok else 'FAIL'} |")
        except Exception as e:  # one row per failure, the table goes on
            rows.append(f"| {name} | - | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | FAIL |")
    against = " (GPU policy forced)" if device.type == "cpu" else ""
    head = [f"### Losses on {device.type}{against} vs CPU float32 ({num_rois} RoIs x {num_classes} classes, "
            f"dense: {num_rois * 4} anchors; tolerance fp32 {TOLERANCE['fp32']:g}, AMP {TOLERANCE['amp']:g})", "",
            "| loss | precision | value | value rel. err | grad rel. err | state rel. err | grad dtype | |",
            "|---|---|---|---|---|---|---|---|"]
    return head + rows


# -- training ------------------------------------------------------------------------------------
def _train_cases(smoke):
    q = os.path.join(ROOT, "configs", "quickstart")
    mask_rcnn = os.path.join(q, "mask_rcnn_R18_FPN_synthetic.yaml")
    from eqlosses_d2 import losses as L

    cases = [(name, mask_rcnn, ["MODEL.EQLOSSES.LOSS", name] + L.required_opts(name))  # CDB-S: its sampler
             for name in _registry_names(L.LOSS_REGISTRY)]
    cases += [
        ("loce (head + MFS)", os.path.join(q, "loce_mask_rcnn_R18_FPN_synthetic.yaml"), []),
        ("pcb + iterative head", mask_rcnn, ["MODEL.EQLOSSES.LOSS", "pcb",
                                             "MODEL.ROI_HEADS.NAME", "LongTailIterativeROIHeads"]),
        ("cascade (softmax)", os.path.join(q, "cascade_mask_rcnn_R18_FPN_synthetic.yaml"), []),
        ("copy-paste + LSJ", os.path.join(q, "copy_paste_mask_rcnn_R18_FPN_synthetic.yaml"), []),
        ("focal RetinaNet", os.path.join(q, "focal_retinanet_R18_FPN_synthetic.yaml"), []),
        ("EFL RetinaNet", os.path.join(q, "efl_retinanet_R18_FPN_synthetic.yaml"), []),
        ("classification softmax", os.path.join(q, "softmax_R18_synthetic_cls.yaml"), []),
        ("classification softmax_eql", os.path.join(q, "softmax_eql_R18_synthetic_cls.yaml"), []),
        ("EFL FCOS", os.path.join(q, "efl_fcos_R18_FPN_synthetic.yaml"), []),
    ]
    return cases[:2] + cases[-1:] if smoke else cases


def check_training(device, smoke, iters, out_dir):
    import train_net
    from detectron2.engine import HookBase

    iters = 3 if smoke else iters
    rows = []
    for name, config, extra in _train_cases(smoke):
        times, losses = [], []

        class Timer(HookBase):
            def before_step(self):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

            def after_step(self):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.start)
                latest = self.trainer.storage.latest()
                if "total_loss" in latest:
                    losses.append(latest["total_loss"][0])

        try:
            opts = ["MODEL.DEVICE", device.type, "SOLVER.AMP.ENABLED", str(device.type == "cuda"),
                    "SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
                    "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SEED", "0",
                    "OUTPUT_DIR", os.path.join(out_dir, "train")] + extra  # one directory: Detectron2 adds log handlers per new one
            if smoke:
                opts += ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
            args = train_net.default_argument_parser().parse_args(["--config-file", config] + opts)
            cfg = train_net.setup(args)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = train_net.Trainer(cfg)
            trainer.register_hooks([Timer()])
            trainer.resume_or_load(resume=False)
            trainer.train()
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            steady = times[10:] if len(times) > 20 else times
            first = statistics.mean(losses[:5]) if losses else float("nan")
            last = statistics.mean(losses[-5:]) if losses else float("nan")
            ok = bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)
            rows.append(f"| {name} | {len(times)} | {statistics.median(steady):.4f} | {peak:.0f} | {first:.3f} | "
                        f"{last:.3f} | {'ok' if ok else 'FAIL'} |")
            del trainer
        except Exception as e:
            rows.append(f"| {name} | - | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | FAIL |")
            traceback.print_exc()
    amp = "AMP" if device.type == "cuda" else "float32"
    head = [f"### Training, quickstart configs ({device.type}, {amp}, {iters} iterations each)", "",
            "| method | iterations | s / iter (median after 10) | peak GPU MB | total loss, first 5 | last 5 | |",
            "|---|---|---|---|---|---|---|"]
    return head + rows


# -- dense losses' memory ---------------------------------------------------------------------
def lvis_retinanet_anchors(images, width=1333, height=800, anchors_per_location=9):
    total = 0
    for stride in (8, 16, 32, 64, 128):
        total += -(-width // stride) * -(-height // stride) * anchors_per_location
    return total * images


def check_dense_memory(device, smoke, images):
    from fvcore.nn import sigmoid_focal_loss

    from eqlosses_d2 import losses as L

    num_classes = 40 if smoke else 1203
    anchors = 4096 if smoke else lvis_retinanet_anchors(images)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(anchors, num_classes, device=device, generator=g) * 2.0 - 4.0
    labels = torch.full((anchors,), num_classes, dtype=torch.long, device=device)
    positive = torch.rand(anchors, device=device, generator=g) < 0.01
    labels[positive] = torch.randint(0, num_classes, (int(positive.sum()),), device=device, generator=g)
    copy_mb = logits.numel() * 4 / 2**20

    def fvcore_step(x):
        target = torch.zeros_like(x)
        fg = labels < num_classes
        target[fg.nonzero(as_tuple=True)[0], labels[fg]] = 1
        (sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, reduction="sum") / max(1, int(fg.sum()))).backward()

    def ours(name):
        loss = L.build_dense_loss(name, num_classes).to(device).train()

        def step(x):
            sum(loss(x, labels, normalizer=max(1.0, float((labels < num_classes).sum()))).values()).backward()
        return step

    rows = []
    for name, step in (("fvcore focal (autograd)", fvcore_step), ("focal (ours)", ours("focal")), ("efl", ours("efl"))):
        try:
            x = logits.clone().requires_grad_()
            step(x)  # warm-up (allocator, kernels)
            x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                extra = float("nan")
            seconds = time.perf_counter() - start
            rows.append(f"| {name} | {extra:.0f} | {extra / copy_mb:.2f} | {seconds * 1000:.1f} |")
            del x
        except Exception as e:
            rows.append(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
    head = [f"### Dense losses at LVIS RetinaNet size on {device.type}: {anchors} anchors "
            f"({images} images of 1333x800) x {num_classes} classes, float32 logits = {copy_mb:.0f} MB", "",
            "| loss | peak extra MB (incl. the gradient) | float32 copies of the logits | ms |", "|---|---|---|---|"]
    return head + rows


# -- Fixed AP -------------------------------------------------------------------------------------
def check_fixed_ap(device, smoke):
    dets = ["50"] if smoke else ["300", "3000"]
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_fixed_ap.py"), "--device", device.type,
            "--images", "2" if smoke else "3", "--dets"] + dets
    if smoke:
        argv += ["--classes", "40", "--size", "64"]
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0:
        lines.append(f"bench_fixed_ap.py failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return lines


SECTIONS = ("losses", "dense", "fixed_ap", "train")  # the longest last: a timeout keeps the others


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "gpu_check"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--iters", type=int, default=100, help="training iterations per method")
    parser.add_argument("--dense-images", type=int, default=2, help="images per GPU of the dense-loss batch")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU at toy sizes")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); --smoke runs it on the CPU",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    import eqlosses_d2  # noqa: F401
    import detectron2

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        where = "CPU (smoke run)"
    header = [f"## GPU check, {time.strftime('%Y-%m-%d')}: {where}; torch {torch.__version__}, "
              f"Detectron2 {detectron2.__version__}", ""]
    report = os.path.join(args.out, "gpu_check.md")
    blocks = [header]
    for section in args.sections:
        start = time.perf_counter()
        if section == "losses":
            lines = check_losses(device, args.smoke)
        elif section == "train":
            with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:  # ~100 MB of checkpoints
                lines = check_training(device, args.smoke, args.iters, workdir)
        elif section == "dense":
            lines = check_dense_memory(device, args.smoke, args.dense_images)
        else:
            lines = check_fixed_ap(device, args.smoke)
        lines += ["", f"({section}: {time.perf_counter() - start:.0f} s)", ""]
        blocks.append(lines)
        with open(report + ".part", "w") as f:  # the tables so far survive a timeout
            f.write("\n".join(line for block in blocks for line in block) + "\n")
        os.replace(report + ".part", report)
        print("\n".join(lines), flush=True)
    failed = sum(line.rstrip().endswith("FAIL |") for block in blocks for line in block)
    print(json.dumps({"report": report, "failed_rows": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
