"""Run by test_distributed.py, alone or under torchrun: calibrate on fixed data and save the scores."""

import sys

import torch
from peft import get_peft_model

from peft_fishertune import FisherTuneConfig, calibrate
from peft_fishertune.quickstart import build_model, synthetic_batch


def main(out: str, steps: int, estimator: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images, labels = synthetic_batch(16, generator)
    data = [{"pixel_values": images[i], "labels": labels[i]} for i in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    config = FisherTuneConfig(
        target_modules=["q_proj", "v_proj", "fc1", "fc2"],
        estimator=estimator,
        perturb_module="backbone.embeddings.patch_embeddings",
    )
    model = get_peft_model(build_model(), config)
    scores = calibrate(model, loader, steps=steps, progress=False)
    from accelerate import PartialState

    if PartialState().is_main_process:
        scores.save(out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
