"""The model measurements, each meant to run in its own process (:func:`harness.run_isolated`).

* :func:`train_step` times one optimisation step of a preset (forward through every head,
  the preset's weighted losses, backward, Adam) on a synthetic batch whose targets come
  from the preset's own mask generators, and reports the step's peak memory.
* :func:`inference` times tiled prediction of a large image with
  :func:`cellkit.engine.predict.predict_probabilities` and relates the model's FLOPs per
  second to the machine's measured matrix-multiply rate and, on a known GPU, to the card's
  bfloat16 dense peak (:data:`PEAK_BF16_TFLOPS`). ``precision`` and ``fold_bn`` are those of
  ``predict_probabilities``.

Run alone, this file measures one inference configuration and prints its JSON, e.g. on a GPU::

    python benchmarks/model_bench.py --size paper --precision auto --fold-bn --device cuda
    python benchmarks/model_bench.py --size cpu --image-size 256 --repeats 1   # a quick CPU check

Both read the memory high-water mark of their own process: on the CPU the resident set
(``VmHWM``, :func:`harness.peak_rss_mb`; ``baseline_rss_mb`` is the mark after imports and
before the model, so
``peak_rss_mb - baseline_rss_mb`` is what the measurement added), on CUDA also
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import synthetic  # noqa: E402
from harness import matmul_rate, measure, peak_rss_mb, synchronize  # noqa: E402

__all__ = [
    "PEAK_BF16_TFLOPS",
    "TimedModel",
    "calibrate_batchnorm",
    "inference",
    "main",
    "peak_bf16_tflops",
    "train_step",
]

#: Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a
#: pattern of ``torch.cuda.get_device_name``; the first match wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),  # not L40 / L40S
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The card's dense bfloat16 peak in TFLOP/s (:data:`PEAK_BF16_TFLOPS`), ``None`` when unknown.

    Examples:
        >>> peak_bf16_tflops("NVIDIA H100 80GB HBM3"), peak_bf16_tflops("NVIDIA L40S"), peak_bf16_tflops(None)
        (989.0, None, None)
    """
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def _setup(threads: int | None, device: str, seed: int) -> float:
    """Threads, seed and the memory baseline of a fresh worker process."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    return peak_rss_mb()


def _memory(device: str, baseline_rss: float) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline_rss}
    out["added_rss_mb"] = out["peak_rss_mb"] - baseline_rss
    if device.startswith("cuda"):
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 1024**2
        out["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 1024**2
    return out


def _batch(batch_size: int, crop: int, num_classes: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic training crops at BCData's density: image, points, classes."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(batch_size):
        points, classes = synthetic.cell_points((crop, crop), num_classes=num_classes, rng=rng)
        image = synthetic.ihc_image((crop, crop), points, classes, rng=rng)
        items.append({"image": image, "points": points, "classes": classes})
    return items


def train_step(
    preset: str,
    size: str,
    batch_size: int = 4,
    crop: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    threads: int | None = None,
    seed: int = 0,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Seconds per training step of ``preset`` at ``size``, and the step's peak memory.

    ``compile_model``: run the model through ``torch.compile`` (inductor); the compilation
    happens in the warm-up steps, whose time is reported as ``compile_s``.

    The model, the losses and the targets are built from the preset with
    :func:`cellkit.build_model`, :func:`cellkit.build_losses` and
    :func:`cellkit.build_targets` (the ``prior`` target from an untrained stage-1 model of
    the preset's ``pretrain`` config). Targets are made once, as the data pipeline would,
    and the time to remake the per-iteration ones (``per_image`` False) for one batch is
    reported as ``targets_ms`` (not part of the step). A step is ``zero_grad``, forward
    through every head, the weighted losses (in float32), backward and ``Adam.step`` with
    the preset's settings, in ``model.train()`` mode; with ``amp``, a float16 autocast
    forward and a gradient scaler, as mixed-precision training does on CUDA.
    """
    import cellkit

    baseline = _setup(threads, device, seed)
    cfg = cellkit.presets.get_preset(preset, size=size)
    num_classes = cfg.model.num_classes
    model = cellkit.build_model(cfg)
    loss_fn = cellkit.build_losses(cfg)
    generators = cellkit.build_targets(cfg)
    if cfg.pretrain is not None:  # what training hands the targets that need it: the stage-1 model
        from cellkit.engine.predict import Predictor
        from cellkit.masks.prepare import PrepareContext

        stage1 = Predictor(cellkit.build_model(cfg.pretrain), cellkit.build_postprocess(cfg.pretrain),
                           cfg.pretrain.model.num_classes, device=device)
        context = PrepareContext(num_classes=num_classes, device=str(device),
                                 load_stage1=lambda: stage1.probabilities)
        for gen in generators.values():
            if hasattr(gen, "prepare"):
                gen.prepare([], context)

    items = _batch(batch_size, crop, num_classes, seed)
    rng = np.random.default_rng(seed)

    def make_targets(per_iteration_only: bool) -> dict[str, np.ndarray]:
        out = {}
        for name, gen in generators.items():
            if per_iteration_only and gen.per_image:
                continue
            out[name] = np.stack(
                [
                    gen(
                        it["points"],
                        it["classes"],
                        shape=(crop, crop),
                        num_classes=num_classes,
                        image=it["image"],
                        rng=rng,
                        key=f"bench{i}",
                    )
                    for i, it in enumerate(items)
                ]
            )
        return out

    targets_np = make_targets(False)
    per_iteration = [name for name, gen in generators.items() if not gen.per_image]
    targets_stats = None
    if per_iteration:
        targets_stats, _ = measure(lambda: make_targets(True), repeats=max(1, min(repeats, 5)), warmup=1)

    from cellkit.imaging import image_to_tensor

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.stack([image_to_tensor(it["image"]) for it in items]).to(device)
    x = x.contiguous(memory_format=memory_format)
    targets = {k: torch.from_numpy(v).to(device) for k, v in targets_np.items()}
    model.to(device=device, memory_format=memory_format)
    loss_fn.to(device)
    model.train()
    params = list(model.parameters())
    if compile_model:
        model = torch.compile(model)
    tc = cfg.train
    optimizer = torch.optim.Adam(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    use_amp = bool(amp and device.startswith("cuda"))
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        with ctx:
            outputs = model(x)
        total, _ = loss_fn({k: v.float() for k, v in outputs.items()}, targets)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        return total

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = None
    if compile_model:  # the first step compiles
        started = time.perf_counter()
        step()
        compile_s = time.perf_counter() - started
    stats, loss = measure(step, repeats=repeats, warmup=warmup, device=device)
    loss_value = float(loss.detach())
    seconds = stats["median_ms"] / 1e3
    result = {
        "preset": preset,
        "size": size,
        "encoder": cfg.model.encoder,
        "heads": list(cfg.model.heads),
        "targets": {name: spec.name for name, spec in cfg.targets.items()},
        "params_m": sum(p.numel() for p in params) / 1e6,
        "batch_size": batch_size,
        "crop": crop,
        "device": device,
        "amp": use_amp,
        "channels_last": bool(channels_last),
        "compiled": bool(compile_model),
        "compile_s": compile_s,
        "step": stats,
        "step_s": seconds,
        "images_per_s": batch_size / seconds,
        "loss_finite": math.isfinite(loss_value),
        "targets_ms": None if targets_stats is None else targets_stats["median_ms"],
        "per_iteration_targets": per_iteration,
        "threads": torch.get_num_threads(),
    }
    result.update(_memory(device, baseline))
    return result


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Give an untrained model's BatchNorm layers the statistics of realistic inputs.

    A freshly built model has running means 0 and variances 1, so in eval mode nothing is
    normalised and activations grow block after block (ResNet-101's overflow float16, and
    the maps are NaN). A trained model's statistics keep them near unit scale; one forward
    pass in training mode over real-looking tiles sets such statistics (a cumulative average,
    ``momentum=None``) without training anything. The timing of inference does not depend on
    the weights' values, but the outputs are then finite and plausible, as with a trained model.

    Shapes:
        images: ``(B, 3, h, w)`` normalised tiles.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    was_training = model.training
    model.train()
    with torch.no_grad():
        model.infer(images)
    model.train(was_training)


class TimedModel(nn.Module):
    """Wraps a cellkit model and adds up the time spent in ``infer`` (the network's share).

    ``predict_probabilities`` calls ``infer`` once per batch of tiles; the rest of its time
    is cutting tiles, uploading and normalising them and blending the maps. On CUDA the
    time is that of CUDA events around each call, read at the end (:attr:`seconds`), so
    timing does not stop the host from queueing the next batch while the GPU works.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.activation = getattr(model, "activation", "sigmoid")
        self._host_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self.calls = 0

    @property
    def seconds(self) -> float:
        """Seconds spent in ``infer`` so far (on CUDA, waits for the queued work first)."""
        total = self._host_seconds
        if self._events:
            torch.cuda.synchronize()
            total += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        return total

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model.infer(x)
            end.record()
            self._events.append((start, end))
            return out
        begin = time.perf_counter()
        out = self.model.infer(x)
        self._host_seconds += time.perf_counter() - begin
        return out


def inference(
    size: str,
    image_size: int = 4096,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    warmup: int = 1,
    repeats: int = 3,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    threads: int | None = None,
    seed: int = 0,
    precision: str | None = None,
    fold_bn: bool = False,
    cudnn_benchmark: bool = False,
) -> dict[str, Any]:
    """Tiled prediction of an ``image_size`` square image with the ``ours`` model of ``size``.

    Warm-up runs ``warmup`` forward passes of one batch of tiles (the shapes of the timed
    run) and one whole prediction when ``warmup > 0``. The model FLOPs are those of one tile
    (:func:`cellkit.models.flops.flops_per_megapixel`, ``FlopCounterMode``) times the number
    of tiles, so the overlap's extra work counts as work done; ``share_of_matmul`` divides
    the FLOPs per second by the measured rate of a large ``torch.mm`` in the same process.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"``, ``"auto"``) and ``fold_bn`` are
    :func:`~cellkit.engine.predict.predict_probabilities`'s (the model is folded once,
    before timing, as :class:`~cellkit.engine.predict.Predictor` does); ``amp`` is the older
    float16 flag. ``share_of_peak`` relates the work done (tile megapixels times
    :data:`cellkit.presets.MEASURED_GFLOPS_PER_MEGAPIXEL` of ``size``) per second to the
    card's dense bfloat16 peak (:func:`peak_bf16_tflops`; ``None`` on the CPU and on cards
    not in the table). ``cudnn_benchmark`` sets ``torch.backends.cudnn.benchmark`` (cuDNN
    then times its algorithms for each tile shape during warm-up).
    """
    import cellkit
    from cellkit.engine.inference import resolve_precision
    from cellkit.engine.predict import predict_probabilities, tile_starts
    from cellkit.models.flops import flops_per_megapixel
    from cellkit.models.fuse import fold_batchnorm
    from cellkit.presets import MEASURED_GFLOPS_PER_MEGAPIXEL

    baseline = _setup(threads, device, seed)
    resolved = resolve_precision(precision, device, amp)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    tile_image = synthetic.ihc_image(
        (synthetic.BCDATA_TILE,) * 2, *synthetic.cell_points((synthetic.BCDATA_TILE,) * 2, rng=seed), rng=seed
    )
    reps = math.ceil(image_size / synthetic.BCDATA_TILE)
    image = np.ascontiguousarray(np.tile(tile_image, (reps, reps, 1))[:image_size, :image_size])

    from cellkit.imaging import image_to_tensor

    cfg = cellkit.presets.ours(size=size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = cellkit.build_model(cfg).to(device=device, memory_format=memory_format)
    tile = min(tile_size, image_size)
    side = min(tile, 256)
    calibrate_batchnorm(
        model,
        torch.stack([image_to_tensor(image[:side, :side]), image_to_tensor(image[-side:, -side:])]).to(
            device
        ),
    )
    model.eval()
    starts = tile_starts(image_size, tile_size, overlap)
    num_tiles = len(starts) ** 2
    flops_per_tile = flops_per_megapixel(model, size=tile) * tile * tile / 1e6
    if resolved == "int8":  # quantized once, before timing (as Predictor does); BatchNorm folded by it
        from cellkit.models.quantize import quantize_int8

        model = quantize_int8(model)
    elif fold_bn:
        model = fold_batchnorm(model)  # once, before timing (as Predictor does)
    rates = {"float32": matmul_rate(device)}
    device_name = None
    if device.startswith("cuda"):
        rates["float16"] = matmul_rate(device, dtype=torch.float16)
        rates["bfloat16"] = matmul_rate(device, dtype=torch.bfloat16)
        device_name = torch.cuda.get_device_name(torch.device(device))

    timed = TimedModel(model)
    use_amp = resolved == "fp16"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    ctx = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    warm = torch.randn(min(batch_size, num_tiles), 3, tile, tile, device=device)
    warm = warm.contiguous(memory_format=memory_format)
    for _ in range(max(warmup, 0)):
        with torch.inference_mode(), ctx:
            model.infer(warm)
    del warm

    def run() -> np.ndarray:
        return predict_probabilities(
            timed,
            image,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            precision="fp32" if resolved == "int8" else resolved,  # int8: the model is already quantized
        )

    if warmup > 0 and device.startswith("cuda"):
        run()  # every shape of the timed run (the last, smaller batch too), pinned memory warmed
    synchronize(device)
    timed = TimedModel(model)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    stats, probs = measure(run, repeats=repeats, warmup=0, device=device)
    seconds = stats["median_ms"] / 1e3
    model_seconds = timed.seconds / repeats
    flops = flops_per_tile * num_tiles
    achieved = flops / seconds
    tiles_4096 = len(tile_starts(4096, tile_size, overlap)) ** 2
    result = {
        "size": size,
        "encoder": cfg.model.encoder,
        "image_size": image_size,
        "tile_size": tile_size,
        "overlap": overlap,
        "batch_size": batch_size,
        "tiles": num_tiles,
        # Tile pixels computed per image pixel (the overlap's extra work): 1.27 at 4096, 1.56 at 2048.
        "tile_overhead": num_tiles * tile * tile / image_size**2,
        # At a constant time per tile, what a 4096 x 4096 image would take (for smaller runs).
        "estimated_seconds_at_4096": seconds / num_tiles * tiles_4096,
        "device": device,
        "device_name": device_name,
        "amp": use_amp,
        "precision": resolved,
        "fold_bn": bool(fold_bn),
        "cudnn_benchmark": bool(cudnn_benchmark) if device.startswith("cuda") else None,
        "channels_last": bool(channels_last),
        "predict": stats,
        "seconds_per_image": seconds,
        "megapixels_per_s": image_size**2 / 1e6 / seconds,
        # Tile pixels through the network per second (image megapixels/s times tile_overhead).
        "tile_megapixels_per_s": num_tiles * tile * tile / 1e6 / seconds,
        "gflops_per_tile": flops_per_tile / 1e9,
        "gflops_per_image": flops / 1e9,
        "gflops_per_s": achieved / 1e9,
        "matmul": rates,
        "share_of_matmul": achieved / rates["float32"]["flops_per_s"],
        "model_share_of_time": min(1.0, model_seconds / seconds),
        "model_gflops_per_s": flops / model_seconds / 1e9 if model_seconds > 0 else None,
        "output_shape": list(probs.shape),
        "output_finite": bool(np.isfinite(probs).all()),
        "threads": torch.get_num_threads(),
    }
    if "float16" in rates:
        result["share_of_matmul_float16"] = achieved / rates["float16"]["flops_per_s"]
    if "bfloat16" in rates:
        result["share_of_matmul_bfloat16"] = achieved / rates["bfloat16"]["flops_per_s"]
    # The card's share: the work done, at the measured FLOPs per megapixel of this size.
    peak = peak_bf16_tflops(device_name)
    measured = MEASURED_GFLOPS_PER_MEGAPIXEL.get(size)
    work_per_s = None if measured is None else measured * 1e9 * result["tile_megapixels_per_s"]
    result["measured_gflops_per_megapixel"] = measured
    result["measured_tflops_per_s"] = None if work_per_s is None else work_per_s / 1e12
    result["peak_bf16_tflops"] = peak
    result["share_of_peak"] = None if peak is None or work_per_s is None else work_per_s / (peak * 1e12)
    result.update(_memory(device, baseline))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure one :func:`inference` configuration and print its JSON (with the machine's description)."""
    from harness import machine_info

    p = argparse.ArgumentParser(description="Time tiled inference of one configuration; print its JSON.")
    p.add_argument("--size", default="paper", choices=("cpu", "paper"), help="model size (default paper)")
    p.add_argument("--image-size", type=int, default=4096, help="side of the square image (default 4096)")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", default=None, help="fp32, bf16, fp16, int8 or auto (default: fp32)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = inference(
        args.size,
        image_size=args.image_size,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
        channels_last=args.channels_last,
        threads=args.threads,
        precision=args.precision,
        fold_bn=args.fold_bn,
        cudnn_benchmark=args.cudnn_benchmark,
    )
    report = {"machine": machine_info(_HERE.parent), "inference": result}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    print(
        f"{result['size']} {result['precision']}{' +fold_bn' if result['fold_bn'] else ''} on "
        f"{result['device_name'] or device}: {result['megapixels_per_s']:.2f} MP/s, "
        f"{result['seconds_per_image']:.3f} s per {args.image_size}^2 image, share of bf16 peak "
        f"{'n/a' if result['share_of_peak'] is None else format(result['share_of_peak'], '.1%')}",
        file=sys.stderr,
    )
    return report


if __name__ == "__main__":
    main()
