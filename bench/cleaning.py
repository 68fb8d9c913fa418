"""PAR step time against FT step time: same model, batch, augmentation and optimizer; PAR adds the reference.

PAR's only extra work over FT is the frozen reference model's forward pass under no_grad (and two distances),
so the ratio should stay well under 1.4. Steps of the two are interleaved so that load on the machine hits
both alike; the median step time of each is reported. Data loading is left out (it is the same for both).

    python -m bench.cleaning                                               # CPU: toy-vit-32, batch 64
    python -m bench.cleaning --arch ViT-B-32 --batch 256 --precision bf16  # GPU (random weights, 224 px)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

from cleaning.augment import par_augment
from cleaning.losses import FeatureBatch, ft_loss, par_loss
from cleaning.train import parameter_groups
from parclean.models import LoadedModel, create_model

CAPTIONS = ("a small red circle at the top left on a black background",
            "a large blue star in the center on a white background",
            "a small green moon at the bottom right on a gray background")


def make_step(loaded: LoadedModel, reference: torch.nn.Module | None, images: torch.Tensor, tokens: torch.Tensor,
              dtype: torch.dtype | None) -> Callable[[int], float]:
    """One training step (augment, forward, loss, backward, AdamW) as a function of the step index."""
    model = loaded.model.train()
    model.logit_scale.requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4), lr=1e-5, betas=(0.9, 0.98), eps=1e-8)
    scale = float(model.logit_scale.exp())
    device = images.device

    def step(index: int) -> float:
        _sync(device)
        start = time.perf_counter()
        augmented = par_augment(images, loaded.mean, loaded.std, seed=0, step=index)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            image, text, _ = model(image=augmented, text=tokens)
            if reference is not None:
                with torch.no_grad():
                    ref_image, ref_text, _ = reference(image=augmented, text=tokens)
        if reference is None:
            loss, _ = ft_loss(FeatureBatch(image.float(), text.float()), scale)
        else:
            features = FeatureBatch(image.float(), text.float(), reference=(ref_image.float(), ref_text.float()))
            loss, _ = par_loss(features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cleaning", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="toy-vit-32", help="open_clip architecture (random weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each objective")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each objective first")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    ft_model = create_model(args.arch, seed=0)
    ft_model.model.to(device)
    par_model = copy.deepcopy(ft_model)
    reference = copy.deepcopy(ft_model.model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, ft_model.image_size, ft_model.image_size, generator=generator).to(device)
    tokens = ft_model.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]).to(device)
    steps = {"ft": make_step(ft_model, None, images, tokens, dtype),
             "par": make_step(par_model, reference, images, tokens, dtype)}
    times: dict[str, list[float]] = {"ft": [], "par": []}
    for index in range(args.warmup + args.steps):
        for name, step in steps.items():
            seconds = step(index)
            if index >= args.warmup:
                times[name].append(seconds)
    ft, par = (statistics.median(times[name]) for name in ("ft", "par"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {where}; torch {torch.__version__}")
    print(f"{args.arch}, batch {args.batch}, precision {args.precision}, {args.steps} timed steps each "
          f"(after {args.warmup} warm-up), median step time:")
    print(f"  FT : {ft * 1000:8.1f} ms/step  {args.batch / ft:8.1f} samples/s")
    print(f"  PAR: {par * 1000:8.1f} ms/step  {args.batch / par:8.1f} samples/s")
    print(f"  PAR / FT = {par / ft:.2f}x")


if __name__ == "__main__":
    main()
