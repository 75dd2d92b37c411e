"""Run by test_distributed.py under torchrun: the three stages in a Trainer with DDP; each rank saves its deltas."""

import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from peft_fishertune import FisherTuneCallback, FisherTuneConfig, create_optimizer
from peft_fishertune.quickstart import build_model, synthetic_batch


def main(out: str) -> None:
    images, labels = synthetic_batch(32, torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()}).with_format("torch")
    config = FisherTuneConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        modules_to_save=["decode_head"],
        warmup_steps=2,
        calibration_steps=2,
        tuning_steps=4,
    )
    model = get_peft_model(build_model(), config)
    args = TrainingArguments(
        output_dir=out + "_run",
        max_steps=6,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(create_optimizer(model, 1e-3, 1e-3), None),
        callbacks=[FisherTuneCallback()],
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    tensors = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors["active"] = torch.tensor(sum(model.base_model.active_counts().values()))
    save_file(tensors, f"{out}_rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
