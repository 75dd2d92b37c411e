"""push_to_hub through huggingface_hub's API with its HTTP layer replaced by a local fake; model card; merging."""

from __future__ import annotations

import base64
import json

import httpx2
import pytest
import torch
from huggingface_hub.utils import _http
from peft import get_peft_model
from transformers import Dinov2Model

from peft_fishertune import FisherTuneConfig, vit_target_modules

from .models import tiny_dinov2

VIT = vit_target_modules()  # the blocks' q, k, v, o, fc1, fc2 under transformers 4.x and 5.x names


class FakeHub:
    """Answers the Hub endpoints an upload uses and records the files of every commit."""

    def __init__(self):
        self.commits: list[dict[str, bytes]] = []
        self.created: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(body["name"])
            return httpx2.Response(
                200, json={"url": f"https://huggingface.co/{body.get('organization')}/{body['name']}"}
            )
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
            self.commits.append(
                {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
            )
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/org/repo/commit/0", "commitOid": "0"}
            )
        return httpx2.Response(404, json={"error": f"not part of the fake: {path}"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    _http.close_session()
    yield hub
    _http.set_client_factory(_http.default_client_factory)
    _http.close_session()


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    tiny_dinov2().save_pretrained(tmp_path / "base")
    config = FisherTuneConfig(
        target_modules=VIT,
        init_selection="random",
        init_weights=False,
        density_max=0.2,
        estimator="variational",
        lam=0.4,
    )
    return get_peft_model(Dinov2Model.from_pretrained(tmp_path / "base"), config)


def test_push_to_hub_uploads_exactly_the_saved_folder(fake_hub, model, tmp_path):
    """The commit holds config, weights and model card, byte for byte what save_pretrained writes."""
    model.push_to_hub("org/repo", token="hf_fake_token")
    model.save_pretrained(tmp_path / "local")
    assert len(fake_hub.commits) == 1
    sent = fake_hub.commits[0]
    assert set(sent) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    for name in sent:
        assert sent[name] == (tmp_path / "local" / name).read_bytes(), name


def test_model_card_records_the_adapter(model, tmp_path):
    """The card names base model, density reached, estimator, gamma/tau/lambda, per-layer densities, loading."""
    model.base_model.set_density(0.1)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again replaces the section instead of repeating it
    card = (tmp_path / "README.md").read_text()
    assert card.count("## FisherTune adapter") == 1
    assert f"base model: `{tmp_path / 'base'}`" in card
    assert "density reached: 0.1000" in card
    assert "estimator: variational; gamma = 0.01, tau = 0.01, lambda = 0.4" in card
    assert "| `encoder.layer.1.mlp.fc2` |" in card
    assert "import peft_fishertune" in card and "library_name: peft" in card


def test_merged_model_round_trips_through_transformers(model, tmp_path):
    """merge_and_unload gives a plain Dinov2Model whose save/from_pretrained reproduces the adapter outputs."""
    x = torch.randn(2, 3, 28, 28)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    merged = model.merge_and_unload()
    assert type(merged) is Dinov2Model
    merged.save_pretrained(tmp_path / "merged")
    reloaded = Dinov2Model.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).last_hidden_state, expected, rtol=0, atol=1e-5)


def test_other_methods_keep_peft_behaviour(tmp_path):
    """A LoRA model's card gets no FisherTune section: the routing only acts on FisherTune adapters."""
    from peft import LoraConfig

    lora = get_peft_model(tiny_dinov2(), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path)
    assert "FisherTune" not in (tmp_path / "README.md").read_text()
