"""``python -m stc.worlds.shapes train [--out DIR] [--seed N] ...``: train the shapes world."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path


def main(argv=None) -> int:
    from .train import WorldConfig

    parser = argparse.ArgumentParser(prog="python -m stc.worlds.shapes",
                                     description="Train the shapes world (builtin:shapes) from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the VAE, then the UNet and text encoder; write the weights")
    train.add_argument("--out", type=Path, default=Path("shapes-world"),
                       help="folder for shapes.safetensors, training.json and the run's checkpoints (default "
                            "./shapes-world); copy the first two into stc/worlds/shapes/ to ship them")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument("--sdxl", action="store_true",
                       help="train the SDXL layout (builtin:shapes-sdxl: two text encoders and an SDXL UNet) on the "
                            "shipped world's VAE; writes shapes-sdxl.safetensors and training-sdxl.json")
    train.add_argument("--reuse-vae", action="store_true",
                       help="take the VAE stage from an earlier run in --out (vae-stage.safetensors)")
    for item in fields(WorldConfig):
        train.add_argument(f"--{item.name.replace('_', '-')}", type=type(item.default), default=item.default,
                           help=f"(default {item.default})")
    photos = sub.add_parser("photos", help="write the example concept's photos (examples/wedge)")
    photos.add_argument("--out", type=Path, required=True)
    photos.add_argument("--count", type=int, default=5)
    photos.add_argument("--seed", type=int, default=7)
    photos.add_argument("--size", type=int, default=128, help="px (default 128: the world's 32 px, 4x sharper)")
    args = parser.parse_args(argv)
    if args.command == "photos":
        from . import concept_scenes

        args.out.mkdir(parents=True, exist_ok=True)
        for index, scene in enumerate(concept_scenes(args.seed, args.count)):
            path = args.out / f"wedge-{index + 1}-{scene.background}.png"
            scene.render(args.size).save(path, optimize=True)
            print(path)
        return 0
    from .train import train_sdxl_world, train_world

    config = WorldConfig(**{item.name: getattr(args, item.name) for item in fields(WorldConfig)})
    if args.sdxl:
        train_sdxl_world(args.out, config, threads=args.threads, log=lambda m: print(m, flush=True))
        return 0
    train_world(args.out, config, threads=args.threads, reuse_vae=args.reuse_vae, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
