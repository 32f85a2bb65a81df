"""XTuner LLaVA folders ("xtuner format") → llavakit: merged LoRAs, projector mapping, strict checks, safe reading.

The folder is written here the way ``xtuner convert pth_to_hf`` writes it: each trained part with its own
``save_pretrained`` (peft writes the LoRA adapters of the LLM and of the CLIP tower, transformers the fully tuned
LLM), and the projector as XTuner's ``ProjectorModel`` saves itself (its config fields, ``model.{0,2}.*`` keys).
The oracle assembles the same weights by hand, in plain torch: W + (lora_alpha / r) · B @ A on every adapted
linear, CLIP's hidden state -2 without its first token, Linear-GELU-Linear, spliced into the LLM's input embeddings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llavakit.conversion.xtuner import import_xtuner, load_xtuner
from llavakit.errors import CheckpointError, ConfigError

PRESET = "debug-clip-llama"
LLM_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
# XTuner's tower LoRA targets every linear of the tower (its find_all_linear_names).
TOWER_LORA = {
    "r": 4,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
PREFIX = "base_model.model."
TEXT = ([5, 6], [7, 8, 9])  # token ids before and after the image
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat_template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _randomise_lora(peft_model, seed: int) -> None:
    """peft initialises B to zero (a no-op adapter); a trained one is not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _write_xtuner(parts, folder: Path, full_llm: bool = False, chat_template: str | None = None) -> Path:
    """An XTuner LLaVA folder over the preset: LLM as ``llm_adapter/`` (or fully tuned at the top), CLIP LoRA in
    ``visual_encoder_adapter/``, ``projector/``."""
    folder.mkdir(parents=True)
    llm = AutoModelForCausalLM.from_pretrained(parts.llm_dir)
    if full_llm:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in llm.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        llm.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(parts.llm_dir)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    else:
        peft_llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, **LLM_LORA))
        _randomise_lora(peft_llm, seed=1)
        peft_llm.save_pretrained(folder / "llm_adapter")
    peft_tower = get_peft_model(
        CLIPVisionModel.from_pretrained(parts.vision_dir), LoraConfig(lora_dropout=0.05, **TOWER_LORA)
    )
    _randomise_lora(peft_tower, seed=2)
    peft_tower.save_pretrained(folder / "visual_encoder_adapter")
    visual, hidden = (
        CLIPVisionModel.from_pretrained(parts.vision_dir).config.hidden_size,
        llm.config.hidden_size,
    )
    (folder / "projector").mkdir()
    projector_config = {
        "architectures": ["ProjectorModel"],
        "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig"},
        "model_type": "projector",
        "visual_hidden_size": visual,
        "llm_hidden_size": hidden,
        "depth": 2,
        "hidden_act": "gelu",
        "bias": True,
        "torch_dtype": "float32",
    }
    (folder / "projector" / "config.json").write_text(json.dumps(projector_config))
    generator = torch.Generator().manual_seed(4)
    projector = {
        "model.0.weight": torch.randn(hidden, visual, generator=generator) * 0.1,
        "model.0.bias": torch.randn(hidden, generator=generator) * 0.1,
        "model.2.weight": torch.randn(hidden, hidden, generator=generator) * 0.1,
        "model.2.bias": torch.randn(hidden, generator=generator) * 0.1,
    }
    save_file(projector, str(folder / "projector" / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _merge_by_hand(model, adapter_dir: Path, lora: dict) -> None:
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, lora_a in adapter.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
                modules[name].weight += (lora_b @ lora_a) * (lora["lora_alpha"] / lora["r"])


def _pixels(tile: int) -> torch.Tensor:
    return torch.randn(1, 3, tile, tile, generator=torch.Generator().manual_seed(0))


def _by_hand(parts, folder: Path, merge: bool = True) -> torch.Tensor:
    """Logits of TEXT around one image, from the folder's parts assembled in plain torch (vocabulary: the LLM's)."""
    tower = CLIPVisionModel.from_pretrained(parts.vision_dir).eval()
    full = (folder / "config.json").is_file()
    llm = AutoModelForCausalLM.from_pretrained(folder if full else parts.llm_dir).eval()
    if merge:
        _merge_by_hand(tower, folder / "visual_encoder_adapter", TOWER_LORA)
        if not full:
            _merge_by_hand(llm, folder / "llm_adapter", LLM_LORA)
    projector = load_file(str(folder / "projector" / "model.safetensors"))
    with torch.no_grad():
        features = tower(_pixels(tower.config.image_size), output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = F.linear(features, projector["model.0.weight"], projector["model.0.bias"])
        image = F.linear(F.gelu(hidden), projector["model.2.weight"], projector["model.2.bias"])
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor([TEXT[0]])), image, embed(torch.tensor([TEXT[1]]))], dim=1)
        return llm(inputs_embeds=embeds).logits


def _ours(model) -> torch.Tensor:
    """The converted model's logits on the same input (import adds ``<image>`` when the tokenizer lacks it)."""
    tile = model.config.image_spec.tile_size
    tokens = (tile // model.config.image_spec.patch_size) ** 2
    ids = torch.tensor([TEXT[0] + [model.config.image_token_id] * tokens + TEXT[1]])
    with torch.no_grad():
        logits = model(
            input_ids=ids, pixel_values=_pixels(tile), image_sizes=torch.tensor([[tile, tile]])
        ).logits
    return logits


def _assert_matches_by_hand(model, parts, folder: Path) -> None:
    expected = _by_hand(parts, folder)
    got = _ours(model)[..., : expected.shape[-1]]  # the LLM's vocabulary; a row added for <image> is new
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _by_hand(parts, folder, merge=False), atol=1e-3)  # the LoRAs matter


@pytest.fixture
def parts(preset_parts):
    return preset_parts(PRESET)


def test_lora_llm_and_tower_import_equals_hand_assembly(parts, tmp_path):
    folder = _write_xtuner(parts, tmp_path / "xtuner")
    # No llm= / vision=: the adapters' base_model_name_or_path name the preset's folders, as peft wrote them.
    model = load_xtuner(folder, template="vicuna_v1")
    assert all("lora_" not in key for key in model.state_dict())
    spec = model.config.image_spec
    assert (spec.aspect_ratio, spec.merge_type, spec.select_feature) == ("pad", "flat", "patch")
    assert (model.config.projector, model.config.select_layer, model.config.template) == (
        "mlp2x_gelu",
        -2,
        "vicuna_v1",
    )
    assert model.image_newline is None
    assert model.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    _assert_matches_by_hand(model, parts, folder)


def test_full_llm_layout_with_xtuner_template_name_through_the_cli(parts, tmp_path):
    from llavakit.cli.main import main
    from llavakit.model.llava_next import LlavaNextModel

    folder = _write_xtuner(parts, tmp_path / "xtuner", full_llm=True, chat_template=LLAMA3_CHAT_TEMPLATE)
    argv = [
        "convert",
        "from-xtuner",
        str(folder),
        "--template",
        "llama3_chat",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--vision", str(parts.vision_dir)]) == 0
    model = LlavaNextModel.from_pretrained(tmp_path / "out")
    assert model.config.template == "tokenizer"  # checked to render XTuner's llama3_chat
    _assert_matches_by_hand(model, parts, folder)


def test_an_xtuner_template_the_tokenizer_does_not_reproduce_is_refused(parts, tmp_path):
    folder = _write_xtuner(parts, tmp_path / "xtuner", full_llm=True, chat_template=LLAMA3_CHAT_TEMPLATE)
    with pytest.raises(
        CheckpointError,
        match=r"XTuner template 'phi3_chat' renders '<s><\|user\|>\\n<image>\\nWhat is shown\?<\|end\|>",
    ):
        load_xtuner(folder, template="phi3_chat", vision=str(parts.vision_dir))
    with pytest.raises(
        CheckpointError, match=r"'vicuna' maps to the tokenizer's chat template, which .* cannot"
    ):
        load_xtuner(_write_xtuner(parts, tmp_path / "plain", full_llm=True), template="vicuna")
    with pytest.raises(ConfigError, match=r"'gpt4' is neither a llavakit template id .* nor an XTuner"):
        load_xtuner(folder, template="gpt4", vision=str(parts.vision_dir))


class _CreatesMarker:
    """Unpickling this opens (so creates) a file: stands for any code a hostile pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("part", ["projector", "llm_adapter", "visual_encoder_adapter"])
def test_a_pickle_holding_code_is_refused_without_running_it(part, parts, tmp_path):
    folder = _write_xtuner(parts, tmp_path / "xtuner")
    safetensors = next((folder / part).glob("*.safetensors"))
    safetensors.unlink()
    marker = tmp_path / "pwned"
    binary = folder / part / ("pytorch_model.bin" if part == "projector" else "adapter_model.bin")
    torch.save({"model.0.weight": torch.zeros(1), "payload": _CreatesMarker(marker)}, binary)
    with pytest.raises(CheckpointError, match=r"holds Python objects besides tensors, so it was refused"):
        load_xtuner(folder, template="vicuna_v1")
    assert not marker.exists()


def _edit_projector(folder: Path, change) -> None:
    file = folder / "projector" / "model.safetensors"
    state = load_file(str(file))
    change(state)
    save_file(state, str(file))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: shutil.rmtree(f / "projector"),
            r"projector is missing: an XTuner LLaVA folder always holds",
        ),
        (
            lambda f: _edit_projector(f, lambda s: s.update({"model.2.weight": torch.zeros(64, 65)})),
            r"projector/model\.safetensors: model\.2\.weight has shape \(64, 65\) but .* has \(64, 64\)",
        ),
        (
            lambda f: _edit_projector(f, lambda s: s.pop("model.2.bias")),
            r"projector/model\.safetensors do not match .*missing \['linear_2\.bias'\]",
        ),
        (
            lambda f: _edit_projector(f, lambda s: s.update({"model.4.weight": torch.zeros(64, 64)})),
            r"projector/model\.safetensors do not match .*unexpected \['model\.4\.weight'\]",
        ),
        (
            lambda f: _set_projector_config(f, visual_hidden_size=128),
            r"visual_hidden_size 128 but the vision tower's hidden_size is 64",
        ),
        (lambda f: _set_projector_config(f, hidden_act="relu"), r"hidden_act='relu'"),
        (
            lambda f: shutil.rmtree(f / "llm_adapter"),
            r"holds no LLM \(it has no config\.json and no llm_adapter/ \(the LLM was frozen\)\); pass llm=",
        ),
        (
            lambda f: _edit_adapter(f / "visual_encoder_adapter"),
            r"visual_encoder_adapter/adapter_model\.safetensors does not match .*missing \[",
        ),
    ],
    ids=[
        "no-projector",
        "projector-shape",
        "projector-missing",
        "projector-extra",
        "projector-width",
        "projector-act",
        "no-llm",
        "tower-lora",
    ],
)
def test_bad_folders_are_refused_naming_file_and_key(change, message, parts, tmp_path):
    folder = _write_xtuner(parts, tmp_path / "xtuner")
    change(folder)
    with pytest.raises(CheckpointError, match=message):
        load_xtuner(folder, template="vicuna_v1")


def _set_projector_config(folder: Path, **fields) -> None:
    file = folder / "projector" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def _edit_adapter(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    state = load_file(str(file))
    state.pop(next(key for key in state if key.endswith("lora_B.weight")))
    save_file(state, str(file))


def test_an_output_inside_the_input_is_refused_before_anything_is_read(parts, tmp_path):
    from llavakit.cli.main import main

    folder = _write_xtuner(parts, tmp_path / "xtuner")
    before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
    with pytest.raises(CheckpointError, match=r"the output .*/xtuner/out lies inside the input"):
        import_xtuner(
            folder, folder / "out", template="no-such-template"
        )  # refused before the template is read
    assert main(["convert", "from-xtuner", str(folder), "--template", "vicuna_v1", "--out", str(folder)]) == 2
    assert sorted(path.relative_to(folder) for path in folder.rglob("*")) == before
