"""Model card and Hub upload of a FisherTune adapter."""

from __future__ import annotations

import os
import tempfile

from .layer import FisherTuneLayer

CARD_START = "<!-- fishertune:start -->"
CARD_END = "<!-- fishertune:end -->"


def fishertune_card_section(peft_model) -> str:
    """Markdown describing every FisherTune adapter of ``peft_model``: base model, density reached, estimator,
    gamma/tau/lambda, per-layer densities, and how to load it."""
    lines = [CARD_START, "## FisherTune adapter", ""]
    for name, config in peft_model.peft_config.items():
        if config.peft_type != "FISHERTUNE":  # PeftType is a str enum
            continue
        layers = {
            module_name.removeprefix("base_model.model."): layer
            for module_name, layer in peft_model.named_modules()
            if isinstance(layer, FisherTuneLayer) and name in layer.fishertune_values
        }
        numel = {n: layer.get_base_layer().weight.numel() for n, layer in layers.items()}
        active = {n: layer.active_count(name) for n, layer in layers.items()}
        total = sum(numel.values())
        reached = sum(active.values()) / total if total else 0.0
        lines += [
            f"### Adapter `{name}`",
            "",
            f"- base model: `{config.base_model_name_or_path}`",
            f"- density reached: {reached:.4f} ({sum(active.values()):,} of {total:,} candidate weights; "
            f"schedule {config.schedule} from {config.density_min} to {config.density_max})",
            f"- estimator: {config.estimator}; gamma = {config.gamma}, tau = {config.tau}, lambda = {config.lam}",
            f"- domain shift: {config.perturb_module or 'input pixels'}, strength {config.perturb_strength}",
            f"- saved values: {config.save_value_dtype}; index encoding: {config.index_encoding}",
            "",
            "| module | entries | active | active fraction of the weight |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{n}` | {layers[n].num_entries(name):,} | {active[n]:,} | {active[n] / numel[n]:.4f} |" for n in layers
        ]
        lines.append("")
    lines += [
        "### How to load",
        "",
        "```python",
        "import peft_fishertune  # registers FisherTune with peft: without it peft fails with KeyError: 'FISHERTUNE'",
        "from peft import PeftModel",
        'model = PeftModel.from_pretrained(base_model, "<this repository>")',
        "```",
        CARD_END,
    ]
    return "\n".join(lines)


def update_model_card(peft_model, output_dir: str) -> None:
    """Write (or replace) the FisherTune section of ``output_dir/README.md``."""
    path = os.path.join(output_dir, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if CARD_START in text and CARD_END in text:
        before, rest = text.split(CARD_START, 1)
        text = before + rest.split(CARD_END, 1)[1].lstrip("\n")
    section = fishertune_card_section(peft_model)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.rstrip("\n") + "\n\n" + section + "\n")


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload exactly the folder ``save_pretrained`` writes (config, weights, model card) to ``repo_id``.

    ``PeftModel.push_to_hub`` of a FisherTune model comes here (``import peft_fishertune`` routes it), because
    the generic one replaces the saved README.md with a card fetched from the Hub.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload FisherTune adapter",
        )
    return info
