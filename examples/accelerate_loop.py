"""FisherTune's three stages in a plain Accelerate loop (CPU, one GPU or many, unchanged).

    python examples/accelerate_loop.py [--warmup 20 --calibration 5 --tuning 40]

Warm-up trains the decode head only; after it, DR-FIM calibration selects the backbone entries; the
tuning stage grows the trained set from density_min to density_max. FisherTuneStages.step(...) after each
optimizer step is the only FisherTune-specific line in the loop.
"""

import argparse

import torch
from accelerate import Accelerator
from peft import get_peft_model

from peft_fishertune import FisherTuneConfig, FisherTuneStages, create_optimizer
from peft_fishertune.quickstart import build_model, synthetic_batch


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--calibration", type=int, default=5)
    parser.add_argument("--tuning", type=int, default=40)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    config = FisherTuneConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        modules_to_save=["decode_head"],
        warmup_steps=args.warmup,
        calibration_steps=args.calibration,
        tuning_steps=args.tuning,
    )
    model = get_peft_model(build_model(), config)
    optimizer = create_optimizer(model, lr=1e-3, backbone_lr=1e-3)
    images, labels = synthetic_batch(64, torch.Generator().manual_seed(0))
    data = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    calibration_loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stages = FisherTuneStages(
        accelerator.unwrap_model(model),
        calibration_loader,
        accelerator=accelerator,
        calibration_kwargs={"progress": False},
    )

    stages.step(0, optimizer)
    batches = iter(loader)
    model.train()
    for step in range(args.warmup + args.tuning):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        info = stages.step(step + 1, optimizer)
        if step % 10 == 0 or step == args.warmup + args.tuning - 1:
            accelerator.print(
                f"step {step + 1:3d} {info.stage:7s} density {info.density:.3f} "
                f"active {info.active:5d} loss {loss.item():.4f}"
            )
    accelerator.end_training()
    return stages.info(args.warmup + args.tuning)


if __name__ == "__main__":
    main()
