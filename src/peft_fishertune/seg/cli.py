"""``fishertune-seg``: prepare datasets, train, evaluate per domain, predict a colour-coded mask.

fishertune-seg prepare gta5 /data/gta5
fishertune-seg train configs/gta2cs_dinov2_large.yaml [--backbone facebook/dinov2-large] [--method lora]
fishertune-seg eval runs/gta2cs/adapter --datasets cityscapes bdd100k mapillary [--root cityscapes=/data/cs]
fishertune-seg predict runs/gta2cs/adapter image.png -o out.png
fishertune-seg demo [--out fishertune_demo]           # embedded data and backbone, no downloads, ~1 min on CPU
fishertune-seg benchmark [--out fishertune_demo]      # every method x 3 seeds on the embedded data
fishertune-seg pretrain --out DIR                     # reproduce the shipped backbone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .run_config import SegRunConfig

RUN_CONFIG_FILE = "seg_config.yaml"
FULL_WEIGHTS_FILE = "model.safetensors"


def build_base(config: SegRunConfig):
    from .model import ViTMask2Former, load_backbone, tiny_decoder_config

    torch.manual_seed(config.seed)
    backbone = load_backbone(config.backbone)
    classes = config.label_space.num_classes
    decoder = tiny_decoder_config(classes) if config.decoder == "tiny" else None
    return ViTMask2Former(backbone, num_classes=classes, decoder_config=decoder)


PATCH_EMBEDDINGS = ("backbone.embeddings.patch_embeddings", "backbone.embeddings.patch_embedding")


def resolve_perturb_module(model, name: str | None) -> str | None:
    """``"auto"``: the backbone's patch embedding under the name its family gives it; anything else as given."""
    if name != "auto":
        return name
    modules = dict(model.named_modules())
    found = next((candidate for candidate in PATCH_EMBEDDINGS if candidate in modules), None)
    if found is None:
        raise ValueError(
            f"perturb_module: auto looks for the backbone's patch embedding ({' or '.join(PATCH_EMBEDDINGS)}) and "
            f"found neither; name the module whose output features get the statistics shift, or null for pixels"
        )
    return found


def wrap(model, config: SegRunConfig):
    """The model for the chosen method: FisherTune or LoRA adapters (decoder in full), full, or frozen."""
    from peft import LoraConfig, get_peft_model

    from ..config import FisherTuneConfig
    from .model import backbone_target_modules

    if config.method == "fishertune":
        return get_peft_model(
            model,
            FisherTuneConfig(
                target_modules=backbone_target_modules(),
                modules_to_save=["decode_head"],
                density_min=config.density_min,
                density_max=config.density_max,
                schedule=config.schedule,
                gamma=config.gamma,
                tau=config.tau,
                lam=config.lam,
                fisher_scale=config.fisher_scale,
                allocation=config.allocation,
                recalibrate_every=config.recalibrate_every,
                estimator=config.estimator,
                perturb_module=resolve_perturb_module(model, config.perturb_module),
                augment_shift=config.augment_shift,
                warmup_steps=config.warmup_steps,
                calibration_steps=config.calibration_steps,
                tuning_steps=config.tuning_steps,
                seed=config.seed,
            ),
        )
    if config.method == "lora":
        return get_peft_model(
            model,
            LoraConfig(
                target_modules=backbone_target_modules(),
                r=config.lora_r,
                lora_alpha=config.lora_r,
                modules_to_save=["decode_head"],
            ),
        )
    if config.method == "frozen":
        model.backbone.requires_grad_(False)
    return model


def optimizer_for(model, config: SegRunConfig):
    """AdamW: backbone-side trainables (deltas, LoRA, or the backbone itself) at backbone_lr, the rest at lr."""
    backbone, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_backbone = "fishertune_values" in name or "lora_" in name or ".backbone." in f".{name}"
            (backbone if is_backbone else head).append(param)
    groups = [{"params": backbone, "lr": config.backbone_lr}, {"params": head, "lr": config.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def training_dataset(config: SegRunConfig):
    from .data import decode_batch, load_segmentation_dataset
    from .transforms import train_transform

    space = config.label_space
    dataset = load_segmentation_dataset(config.train_dataset, config.train_root, config.train_split, space)
    generator = torch.Generator().manual_seed(config.seed)
    scale = tuple(config.train_scale)

    def augment(batch):
        decoded = decode_batch(batch, space)
        pairs = [
            train_transform(x, y, generator, crop=config.crop, scale=scale, ignore_index=space.ignore_index)
            for x, y in zip(decoded["pixel_values"], decoded["labels"])
        ]
        return {"pixel_values": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}

    dataset.set_transform(augment)
    return dataset


def collate(items):
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
    }


def train(config: SegRunConfig) -> Path:
    """Train with the Trainer (the three FisherTune stages through its callback); returns the adapter folder."""
    from transformers import Trainer, TrainingArguments

    from ..callback import FisherTuneCallback

    model = wrap(build_base(config), config)
    args = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        bf16=config.bf16,
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    callbacks = [FisherTuneCallback()] if config.method == "fishertune" else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=training_dataset(config),
        data_collator=collate,
        optimizers=(optimizer_for(model, config), None),
        callbacks=callbacks,
    )
    trainer.train()
    out = Path(config.output_dir) / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out)
    else:
        from safetensors.torch import save_model

        save_model(model, str(out / FULL_WEIGHTS_FILE))
    config.save(out / RUN_CONFIG_FILE)
    return out


def load_trained(folder: str | Path):
    """The model saved by ``train`` in ``folder`` (with its run config), in eval mode."""
    folder = Path(folder)
    config_file = folder / RUN_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: {folder} is not a folder written by fishertune-seg train")
    config = SegRunConfig.load(config_file)
    model = build_base(config)
    if config.method in ("fishertune", "lora"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    else:
        from safetensors.torch import load_model

        load_model(model, str(folder / FULL_WEIGHTS_FILE))
    return model.eval(), config


def evaluate_run(folder, datasets: list[str], roots: dict[str, str], progress=True) -> dict[str, dict]:
    """Per-class IoU and mIoU of a trained run on each named dataset: {name: {"mean_iou", "per_class_iou"}}.

    A name is a key of the run config's ``eval_datasets`` or a known layout; ``roots`` (NAME=PATH) replace or
    supply root folders."""
    from .data import LAYOUTS, load_segmentation_dataset
    from .evaluation import TEST_SCALES, evaluate_per_class

    model, config = load_trained(folder)
    space = config.label_space
    data, scales = {}, {}
    for name in datasets:
        if name in config.eval_datasets:
            spec = config.eval_dataset(name)
        elif name in LAYOUTS and name in roots:
            spec = {"layout": name, "root": roots[name], "split": None, "short_side": None}
        else:
            raise ValueError(f"no evaluation dataset {name!r} in the run config: add it, or pass --root {name}=PATH")
        root = roots.get(name, spec["root"])
        data[name] = load_segmentation_dataset(spec["layout"], root, spec["split"], space)
        short = spec["short_side"]
        scales[name] = (float("inf"), short) if short else TEST_SCALES.get(spec["layout"])
    return evaluate_per_class(
        model, data, scales, config.window, config.stride, space.num_classes, progress, space.ignore_index
    )


def per_class_table(results: dict[str, dict], names) -> str:
    """Markdown: one row per class (IoU % per domain), then mIoU; the last column is the mean over domains."""
    domains = list(results)
    lines = ["| class | " + " | ".join(domains) + " | mean |", "|---|" + "---|" * (len(domains) + 1)]

    def cells(values):
        shown = ["n/a" if np.isnan(v) else f"{100 * v:.1f}" for v in values]
        finite = [v for v in values if not np.isnan(v)]
        return " | ".join(shown) + f" | {100 * np.mean(finite):.1f}" if finite else " | ".join(shown) + " | n/a"

    for k, name in enumerate(names):
        lines.append(f"| {name} | " + cells([results[d]["per_class_iou"][k] for d in domains]) + " |")
    lines.append("| **mIoU** | " + cells([results[d]["mean_iou"] for d in domains]) + " |")
    return "\n".join(lines)


def predict(folder, image_path: str, output: str) -> np.ndarray:
    """Colour-coded mask of one image, in the run's class colours; returns the class indices."""
    from PIL import Image

    from .data import read_image
    from .inference import predict_labels, slide_inference

    model, config = load_trained(folder)
    space = config.label_space
    image = torch.from_numpy(read_image(image_path)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        logits = slide_inference(
            lambda x: model(pixel_values=x).logits, image[None], space.num_classes, config.window, config.stride
        )
    mask = predict_labels(logits, image.shape[-2:])[0].numpy()
    Image.fromarray(space.colorize(mask)).save(output)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fishertune-seg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="write train-id labels and an index for a dataset folder")
    p.add_argument("dataset", help="a layout: gta5, cityscapes, bdd100k, acdc, mapillary or folder (your own data)")
    p.add_argument("root")
    p.add_argument("--config", help="folder: the run config whose classes, ignore_index and label_map apply")
    t = commands.add_parser("train", help="train from a YAML run config")
    t.add_argument("config")
    t.add_argument("--backbone")
    t.add_argument("--method", choices=["fishertune", "full", "frozen", "lora"])
    t.add_argument("--output-dir")
    e = commands.add_parser("eval", help="per-domain mIoU of a trained run")
    e.add_argument("folder")
    e.add_argument("--datasets", nargs="+", required=True)
    e.add_argument("--root", action="append", default=[], help="NAME=PATH, overrides the run config's roots")
    r = commands.add_parser("predict", help="colour-coded mask of one image")
    r.add_argument("folder")
    r.add_argument("image")
    r.add_argument("-o", "--output", required=True)
    for name, text in (
        ("demo", "FisherTune's three stages on the embedded multi-domain data, with figures"),
        ("benchmark", "every method x seeds on the embedded data: table and plot"),
        (
            "study",
            "the paper's sensitivity studies (lambda, gamma/tau, schedule, density, allocation) on the embedded data",
        ),
    ):
        d = commands.add_parser(name, help=text)
        d.add_argument("--out", default="fishertune_demo", help="folder for the tables, figures and adapter")
        d.add_argument("--reduced", action="store_true", help="a few steps of each stage (a smoke test)")
        d.add_argument("--backbone", help="a backbone folder other than the shipped one")
        d.add_argument("--no-progress", action="store_true")
        for key in ("train_images", "eval_images", "warmup_steps", "calibration_steps", "tuning_steps"):
            d.add_argument("--" + key.replace("_", "-"), type=int, help=f"override the budget's {key}")
        if name == "demo":
            d.add_argument("--seed", type=int, default=0)
        else:
            d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        if name == "benchmark":
            d.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
        if name == "study":
            d.add_argument("--sections", nargs="+", default=None, help="sections (default: all but 'calibration')")
            d.add_argument("--workers", type=int, default=1, help="processes (one torch thread each) for the runs")
    p = commands.add_parser("pretrain", help="pre-train the small backbone shipped with the package")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pool", type=int, default=6000, help="pre-generated scenes drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.command in ("demo", "benchmark", "study"):
        return _embedded(args)
    if args.command == "pretrain":
        from .foundation import pretrain

        summary = pretrain(
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            pool=args.pool,
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(f"saved the backbone to {args.out}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        return 0

    if args.command == "prepare":
        from .data import prepare, prepare_folder

        if args.dataset == "folder":
            space = SegRunConfig.load(args.config).label_space if args.config else SegRunConfig().label_space
            _print_folder_report(prepare_folder(args.root, space), space, args.root)
        else:
            print(f"wrote {prepare(args.dataset, args.root)} label files and the index under {args.root}")
    elif args.command == "train":
        config = SegRunConfig.load(args.config, backbone=args.backbone, method=args.method, output_dir=args.output_dir)
        print(f"saved to {train(config)}")
    elif args.command == "eval":
        roots = dict(item.split("=", 1) for item in args.root)
        results = evaluate_run(args.folder, args.datasets, roots)
        print(per_class_table(results, load_trained_config(args.folder).label_space.names))
    else:
        predict(args.folder, args.image, args.output)
        print(f"wrote {args.output}")
    return 0


def load_trained_config(folder) -> SegRunConfig:
    return SegRunConfig.load(Path(folder) / RUN_CONFIG_FILE)


def _print_folder_report(report: dict, space, root) -> None:
    print(f"{root}: " + ", ".join(f"{split} {r['images']} images" for split, r in report.items()))
    splits = list(report)
    print("| class | " + " | ".join(f"{s} pixels %" for s in splits) + " |\n|---|" + "---|" * len(splits))
    for k, name in enumerate([*space.names, f"(ignore {space.ignore_index})"]):
        shares = [100 * r["pixels"][k] / max(sum(r["pixels"]), 1) for r in report.values()]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
    print(f"wrote the index {Path(root) / 'fishertune_index.json'}")


def _embedded(args) -> int:
    from dataclasses import replace

    from .demo import run_benchmark, run_demo
    from .embedded import METHODS, Budget

    budget = Budget.reduced() if args.reduced else Budget()
    overrides = {
        key: getattr(args, key)
        for key in ("train_images", "eval_images", "warmup_steps", "calibration_steps", "tuning_steps")
    }
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    if args.command == "demo":
        run_demo(args.out, budget, seed=args.seed, progress=not args.no_progress, backbone_path=args.backbone)
    elif args.command == "study":
        from .study import PAPER_SECTIONS, SECTIONS, run_study

        sections = args.sections or PAPER_SECTIONS
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise SystemExit(f"unknown section(s) {unknown}; sections: {', '.join(SECTIONS)}")
        run_study(args.out, budget, args.seeds, sections, not args.no_progress, args.backbone, args.workers)
    else:
        methods = args.methods or METHODS
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
        run_benchmark(
            args.out,
            budget,
            seeds=args.seeds,
            methods=methods,
            progress=not args.no_progress,
            backbone_path=args.backbone,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
