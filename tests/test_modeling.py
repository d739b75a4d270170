"""MSClipModel: official parity through the converter, sharing, attention backends, save/load and Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REFERENCE_DIR, assert_close_to_scale, needs_reference
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification

from modeling_msclip import MSClipConfig, MSClipForImageClassification, MSClipForPreTraining, MSClipModel
from modeling_msclip.configuration_msclip import SHAREABLE_HEAD_COMPONENTS
from modeling_msclip.convert_original_msclip import ConversionError, convert_state_dict, load_official_config
from modeling_msclip.convert_original_msclip import main as convert_official_main

REFERENCE = REFERENCE_DIR
TOLERANCE = 1e-5  # relative to the compared tensor's scale: max|a - b| <= TOLERANCE * max(1, max|b|)


@pytest.fixture(scope="module", params=["msclip_s_tiny", "clip_tiny"])
def converted(request, tmp_path_factory):
    """Convert a reference model with the command line, then load it the way users do."""
    name = request.param
    output = tmp_path_factory.mktemp(name) / "model"
    convert_official_main(
        [
            "--config",
            str(REFERENCE / name / "config.json"),
            "--checkpoint",
            str(REFERENCE / name / "state_dict.safetensors"),
            "--output",
            str(output),
        ]
    )
    return name, output


def tiny_inputs(config: MSClipConfig, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    lengths = [5, 12, 77][:batch] + [9] * max(0, batch - 3)
    input_ids = torch.zeros(batch, 77, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = 49406
        input_ids[row, 1 : length - 1] = torch.randint(1, 49406, (length - 2,), generator=generator)
        input_ids[row, length - 1] = 49407
    attention_mask = (torch.arange(77)[None] < torch.tensor(lengths)[:, None]).long()
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


# ------------------------------------------------------------------------------------------------- official parity


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@needs_reference
def test_converted_reference_reproduces_every_official_output(converted, attn_implementation):
    name, output = converted
    model = MSClipModel.from_pretrained(output, attn_implementation=attn_implementation).eval()
    inputs = load_file(REFERENCE / name / "inputs.safetensors")
    expected = load_file(REFERENCE / name / "outputs.safetensors")

    captured: dict[str, torch.Tensor] = {}

    def capture(key):
        return lambda module, args, result: captured.__setitem__(key, result)

    vision = model.vision_model
    hooks = [
        vision.embeddings.patch_embedding.register_forward_hook(capture("vision_stem_output")),
        model.projection_head.layer_norm("vision").register_forward_hook(capture("vision_pooled_ln_post_output")),
        model.projection_head.layer_norm("text").register_forward_hook(capture("text_pooled_ln_final_output")),
    ]
    if vision.parallel_branch is not None:
        stages = [vision.parallel_branch.first_stage, *vision.parallel_branch.bottlenecks]
        for index, stage in enumerate(stages):
            hooks.append(stage.register_forward_hook(capture(f"vision_parallel_branch_output_{index}")))
        for index, adapter in enumerate(vision.lateral_adapters):
            hooks.append(adapter.register_forward_hook(capture(f"vision_lateral_adapter_output_{index}")))
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], output_hidden_states=True)
    for hook in hooks:
        hook.remove()

    checks = {
        "image_embeds_unnorm": out.vision_model_output.pooler_output,
        "text_embeds_unnorm": out.text_model_output.pooler_output,
        "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds,
        "logits_per_image": out.logits_per_image,
        "logits_per_text": out.logits_per_text,
        "vision_ln_pre_output": out.vision_model_output.hidden_states[0],
        "vision_block_outputs": torch.stack(out.vision_model_output.hidden_states[1:]),
        "vision_last_hidden_state": out.vision_model_output.last_hidden_state,
        **captured,
    }
    # The text tower drops padding after the longest caption's end token (exact under causal attention): compare
    # the positions it ran; the untrimmed run is checked in test_trimmed_text_equals_full_width_text.
    length = out.text_model_output.last_hidden_state.shape[1]
    checks["text_embedding_output"] = out.text_model_output.hidden_states[0]
    checks["text_block_outputs"] = torch.stack(out.text_model_output.hidden_states[1:])
    checks["text_last_hidden_state"] = out.text_model_output.last_hidden_state
    expected["text_embedding_output"] = expected["text_embedding_output"][:, :length]
    expected["text_block_outputs"] = expected["text_block_outputs"][:, :, :length]
    expected["text_last_hidden_state"] = expected["text_last_hidden_state"][:, :length]

    reference_keys = {k for k in expected if k not in ("logit_scale", "text_embeds_unnorm_truncated")}
    assert reference_keys == set(checks), f"unchecked reference outputs: {reference_keys ^ set(checks)}"
    for key, value in checks.items():
        # float32 rounding (eager or sdpa's fused kernel, the CPU, the thread count) leaves an error of at most ~3e-6
        # of each output's scale, hidden states of magnitude ~15 included: a tolerance relative to the scale holds.
        assert_close_to_scale(value, expected[key], TOLERANCE, key)
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale[0].item() == expected["logit_scale"].item()

    with torch.no_grad():
        truncated = model.get_text_features(input_ids=inputs["input_ids_truncated"]).pooler_output
    assert_close_to_scale(truncated, expected["text_embeds_unnorm_truncated"], TOLERANCE, "truncated text embeds")


@needs_reference
def test_trimmed_text_equals_full_width_text(converted):
    name, output = converted
    model = MSClipModel.from_pretrained(output, attn_implementation="eager").eval()
    inputs = load_file(REFERENCE / name / "inputs.safetensors")
    expected = load_file(REFERENCE / name / "outputs.safetensors")
    model.config.text_config.trim_padding = False
    with torch.no_grad():
        full = model.get_text_features(inputs["input_ids"][:3], output_hidden_states=True)
    assert full.last_hidden_state.shape[1] == 77
    assert_close_to_scale(full.last_hidden_state, expected["text_last_hidden_state"][:3], TOLERANCE, "full width")
    model.config.text_config.trim_padding = True
    with torch.no_grad():
        trimmed = model.get_text_features(inputs["input_ids"][:3], output_hidden_states=True)
    assert trimmed.last_hidden_state.shape[1] == 30  # end-of-text positions 4, 11, 29
    assert_close_to_scale(trimmed.pooler_output, full.pooler_output, 1e-6, "trimmed vs full pooler output")


@needs_reference
def test_converted_config_equals_preset():
    """The converter's reading of the official tiny config yields exactly our tiny presets' architecture."""
    from modeling_msclip.convert_original_msclip import config_from_official

    for name, preset in (("msclip_s_tiny", "msclip-s-tiny"), ("clip_tiny", "clip-tiny")):
        converted = config_from_official(load_official_config(REFERENCE / name / "config.json"))
        reference = MSClipConfig.from_preset(preset, logit_scale_init_value=1.0)
        assert converted.to_diff_dict() == reference.to_diff_dict()


# ------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("preset", "manifest"),
    [
        ("msclip-s-b32", "b32-yfcc-msclips.yaml"),
        ("msclip-s-b16", "b16-yfcc-msclips.yaml"),
        ("clip-b32", "b32.yaml"),
    ],
)
@needs_reference
def test_full_size_unique_parameter_counts_match_official_manifests(preset, manifest):
    summary = json.loads((REFERENCE / "manifests" / "summary.json").read_text())
    with torch.device("meta"):
        model = MSClipModel(MSClipConfig.from_preset(preset))
    unique = sum(p.numel() for p in model.parameters())
    assert unique == summary[manifest]["unique_parameter_count"]
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared." in n)
    assert shared == summary[manifest]["shared_parameter_count"]
    buffers = sum(b.numel() for b in model.buffers())
    assert buffers == summary[manifest]["unique_buffer_numel"]


# ------------------------------------------------------------------------------------------------- converter errors


@needs_reference
def test_official_converter_rejects_bad_checkpoints():
    config = MSClipConfig.from_preset("msclip-s-tiny")
    state = load_file(REFERENCE / "msclip_s_tiny" / "state_dict.safetensors")
    with pytest.raises(ConversionError, match="missing keys.*transformer.resblocks.3.mlp.c_fc.weight"):
        convert_state_dict({k: v for k, v in state.items() if k != "transformer.resblocks.3.mlp.c_fc.weight"}, config)
    with pytest.raises(ConversionError, match="unexpected keys.*extra.weight"):
        convert_state_dict({**state, "extra.weight": torch.zeros(1)}, config)
    tampered = dict(state)
    tampered["transformer.resblocks.5.mlp.c_fc.bias"] = state["transformer.resblocks.5.mlp.c_fc.bias"] + 1e-3
    with pytest.raises(ConversionError, match="copies of a shared tensor disagree.*resblocks.5.mlp.c_fc.bias"):
        convert_state_dict(tampered, config)


@needs_reference
def test_official_converter_reads_pth_with_prefixes_and_yaml_base(tmp_path):
    import yaml

    from modeling_msclip.convert_original_msclip import convert

    state = load_file(REFERENCE / "msclip_s_tiny" / "state_dict.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    merged = json.loads((REFERENCE / "msclip_s_tiny" / "config.json").read_text())["merged_official_config"]
    custom = merged.pop("CUSTOM")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(merged))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"BASE": ["base.yaml"], "CUSTOM": custom}))
    model = convert(tmp_path / "exp.yaml", tmp_path / "ckpt.pth")
    inputs = load_file(REFERENCE / "msclip_s_tiny" / "inputs.safetensors")
    expected = load_file(REFERENCE / "msclip_s_tiny" / "outputs.safetensors")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert_close_to_scale(image, expected["image_embeds_unnorm"], TOLERANCE, "image embeds from the .pth")
    with pytest.raises(FileExistsError):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("user data")
        convert(tmp_path / "exp.yaml", tmp_path / "ckpt.pth", output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_transformers_clip_conversion_keeps_logits(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from modeling_msclip.convert_clip import main as convert_clip_main

    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 49408,
            "eos_token_id": 49407,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    clip = CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    convert_clip_main(["--input", str(tmp_path / "clip"), "--output", str(tmp_path / "msclip")])
    model = AutoModel.from_pretrained(tmp_path / "msclip").eval()
    assert isinstance(model, MSClipModel)
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = clip(**inputs)
    assert_close_to_scale(ours.logits_per_image, theirs.logits_per_image, TOLERANCE, "logits_per_image")
    with torch.no_grad():
        their_text = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert_close_to_scale(ours.text_model_output.pooler_output, their_text.pooler_output, TOLERANCE, "text pooler")


# ------------------------------------------------------------------------------------------------- model behaviour

TINY_PRESETS = ["msclip-s-tiny", "msclip-tiny", "clip-tiny", "single-tower-tiny"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_eager_and_sdpa_agree_and_expose_hidden_states(preset):
    torch.manual_seed(0)
    config = MSClipConfig.from_preset(preset)
    eager = MSClipModel._from_config(config, attn_implementation="eager").eval()
    sdpa = MSClipModel._from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    inputs = tiny_inputs(config)
    with torch.no_grad():
        a = eager(**inputs, output_hidden_states=True, output_attentions=True)
        b = sdpa(**inputs, output_hidden_states=True)
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        assert_close_to_scale(a[key], b[key], TOLERANCE, f"eager vs sdpa {key}")
    vision_blocks = config.vision_config.num_hidden_layers - config.vision_config.first_attention_layer
    assert len(a.vision_model_output.hidden_states) == vision_blocks + 1
    assert len(a.vision_model_output.attentions) == vision_blocks
    assert len(a.text_model_output.hidden_states) == config.text_config.num_hidden_layers + 1
    grid = config.vision_config.grid_size**2 + 1
    assert a.vision_model_output.attentions[0].shape == (3, config.vision_config.num_attention_heads, grid, grid)
    text_attention = a.text_model_output.attentions[-1]
    if config.text_config.causal:
        assert torch.all(text_attention.triu(1) == 0), "text attention must be causal"
    row_sums = text_attention.sum(-1)
    assert_close_to_scale(row_sums, torch.ones_like(row_sums), 1e-5, "text attention row sums")
    vision_attention = a.vision_model_output.attentions[-1]
    assert (vision_attention.triu(1) > 0).any(), "image attention must be bidirectional"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_shared_parameters_are_stored_once_and_round_trip_bit_exactly(preset, tmp_path):
    torch.manual_seed(0)
    config = MSClipConfig.from_preset(preset)
    model = MSClipModel(config).eval()
    state = model.state_dict()
    pointers = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers)), "a tensor is stored under two names"
    shared_keys = [k for k in state if ".shared." in k]
    assert bool(shared_keys) == any(config.shared_components)
    for position, components in enumerate(config.shared_components):
        layer = model.encoder.layers[position]
        for name, module in (
            ("attention", layer.self_attn),
            ("mlp", layer.mlp),
            ("layer_norm1", layer.layer_norm1),
            ("layer_norm2", layer.layer_norm2),
        ):
            assert module.is_shared == (name in components)
            if module.is_shared:
                assert module.for_modality("text") is module.for_modality("vision")
    # The head is built by the same rule, from shared_head_components.
    for name in SHAREABLE_HEAD_COMPONENTS:
        module = getattr(model.projection_head, name)
        assert module.is_shared == (name in config.shared_head_components)
        assert module.is_shared == preset.startswith("single-tower")
        assert (module.for_modality("text") is module.for_modality("vision")) == module.is_shared

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(state)
    reloaded = MSClipModel.from_pretrained(tmp_path).eval()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    inputs = tiny_inputs(config)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, reloaded(**inputs).logits_per_image)


def test_missing_weights_are_initialised_under_meta_loading(tmp_path):
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    MSClipModel(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [
        k for k in state if k == "logit_scale" or "running_var" in k or "projection_head.final_layer_norm.text" in k
    ]
    save_file(
        {k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    model = MSClipModel.from_pretrained(tmp_path)
    assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            assert torch.equal(buffer, torch.ones_like(buffer)), name
    assert torch.equal(model.projection_head.layer_norm("text").weight, torch.ones(128))
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_batch_norm_uses_running_statistics_in_eval_mode():
    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset("msclip-s-tiny"))
    pixels = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        single = model.get_image_features(pixel_values=pixels[:1]).pooler_output
        batched = model.get_image_features(pixel_values=pixels).pooler_output[:1]
    assert_close_to_scale(single, batched, 1e-5, "eval outputs must not depend on the batch")
    model.train()
    before = model.vision_model.parallel_branch.first_stage[1].running_mean.clone()
    model.get_image_features(pixel_values=pixels)
    assert not torch.equal(before, model.vision_model.parallel_branch.first_stage[1].running_mean)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    inputs = tiny_inputs(config, batch=4)
    reference_state = MSClipModel(config).state_dict()
    grads = []
    for checkpointing in (False, True):
        model = MSClipModel._from_config(config, attn_implementation="sdpa")
        model.load_state_dict(reference_state)
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        model.train()
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close_to_scale(grads[1][name], grads[0][name], 1e-6, f"checkpointed grad of {name}")


@pytest.mark.parametrize("preset", ["msclip-s-tiny", "single-tower-tiny"])
def test_image_classification_loads_vision_weights_from_an_msclip_checkpoint(tmp_path, preset):
    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset(preset)).eval()
    model.save_pretrained(tmp_path)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=5).eval()
    assert isinstance(classifier, MSClipForImageClassification)
    assert not any(k.startswith("text_model") or ".text." in k for k in classifier.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    # The classifier's pooled feature (head LayerNorm of the class token) must be the dual encoder's.
    pooled = {}
    for name, owner in (("model", model), ("classifier", classifier)):
        norm = owner.projection_head.layer_norm("vision")
        assert norm is owner.projection_head.final_layer_norm["shared" if preset.startswith("single") else "vision"]
        norm.register_forward_hook(lambda module, args, output, name=name: pooled.__setitem__(name, output))
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
        classifier(pixel_values=pixels)
    expected_pooled, got_pooled = pooled["model"], pooled["classifier"]
    assert torch.equal(expected_pooled, got_pooled)
    out = classifier(pixel_values=pixels, labels=torch.tensor([1, 4]))
    assert out.logits.shape == (2, 5)
    out.loss.backward()
    assert classifier.classifier.weight.grad is not None


def test_auto_classes_resolve_saved_models(tmp_path):
    MSClipModel(MSClipConfig.from_preset("clip-tiny")).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MSClipConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MSClipModel)
    assert isinstance(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path), MSClipModel)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForZeroShotImageClassification"] == "modeling_msclip.MSClipModel"
    assert {"modeling_msclip.py", "configuration_msclip.py"} <= {p.name for p in tmp_path.iterdir()}


REMOTE_LOAD = """
import sys, torch
sys.modules["modeling_msclip"] = None  # make the installed package unimportable
from transformers import AutoModel, AutoModelForImageClassification
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "modeling_msclip" not in type(model).__module__.split(".")[0], type(model).__module__
data = torch.load(sys.argv[2], weights_only=False)
with torch.no_grad():
    logits = model(**data["inputs"]).logits_per_image
assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True, num_labels=3)
from transformers import pipeline
classifier = pipeline("zero-shot-image-classification", model=sys.argv[1], trust_remote_code=True)
scores = {r["label"]: r["score"] for r in classifier(data["image"], candidate_labels=data["labels"])}
for label, expected in data["scores"].items():
    assert abs(scores[label] - expected) < 1e-5, (label, scores[label], expected)
print("REMOTE-OK", type(model).__module__, type(classifier.tokenizer).__module__)
"""


def test_remote_code_loads_without_the_package(tmp_path, msclip_tokenizer_dir):
    from PIL import Image
    from transformers import pipeline

    from modeling_msclip import MSClipImageProcessor, MSClipProcessor, MSClipTokenizer

    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).eval()
    model.save_pretrained(tmp_path / "model")
    MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset("msclip", image_size=64),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    ).save_pretrained(tmp_path / "model")
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    image = Image.fromarray(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy())
    labels = ["a dog", "a cat"]
    in_process = pipeline("zero-shot-image-classification", model=str(tmp_path / "model"))
    scores = {r["label"]: r["score"] for r in in_process(image, candidate_labels=labels)}
    torch.save(
        {"inputs": inputs, "logits": logits, "image": image, "labels": labels, "scores": scores},
        tmp_path / "expected.pt",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "model"), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK transformers_modules" in result.stdout
    assert result.stdout.strip().split()[-1].startswith("transformers_modules"), "the tokenizer must be remote code"


# ------------------------------------------------------------------------------------------------- config errors


def test_config_rejects_impossible_sharing():
    with pytest.raises(ValueError, match="needs equal text and vision hidden_size"):
        MSClipConfig.from_preset("clip-b32", shared_components=[["mlp"]] * 12)
    with pytest.raises(ValueError, match="conv stem replaces vision block 0"):
        MSClipConfig.from_preset("msclip-s-tiny", shared_components=[["attention"]] * 12)
    with pytest.raises(ValueError, match="unknown components"):
        MSClipConfig.from_preset("msclip-tiny", shared_components=[["ffn"]] * 12)
    with pytest.raises(ValueError, match="unknown MS-CLIP preset 'nope'"):
        MSClipConfig.from_preset("nope")
    with pytest.raises(ValueError, match="total stride"):
        MSClipConfig.from_preset("msclip-s-tiny", vision_config={"patch_size": 16, "conv_stem_strides": [2, 2, 2, 2]})
    with pytest.raises(ValueError, match="sharing 'projection' in the heads needs equal text and vision hidden_size"):
        MSClipConfig.from_preset("clip-b32", shared_head_components=["projection"])
    with pytest.raises(ValueError, match="sharing 'final_layer_norm' in the heads needs equal .* layer_norm_eps"):
        MSClipConfig.from_preset(
            "msclip-tiny", shared_head_components=["final_layer_norm"], text_config={"layer_norm_eps": 1e-5}
        )
    with pytest.raises(ValueError, match=r"shared_head_components has unknown components \['ln_post'\]"):
        MSClipConfig.from_preset("msclip-tiny", shared_head_components=["ln_post"])
    with pytest.raises(ValueError, match=r"shared_settings_from must be one of \('text', 'vision'\), got 'image'"):
        MSClipConfig.from_preset("msclip-tiny", shared_settings_from="image")
    with pytest.raises(
        ValueError, match=r"share_projection_head=True .* contradicts shared_head_components=\['projection'\]"
    ):
        MSClipConfig.from_preset("msclip-tiny", share_projection_head=True, shared_head_components=["projection"])


def test_bad_inputs_get_clear_errors():
    model = MSClipModel(MSClipConfig.from_preset("clip-tiny"))
    with pytest.raises(ValueError, match="expects 64x64"):
        model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at most 77"):
        model.get_text_features(input_ids=torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="needs both"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True)
    assert features.pooler_output.shape == (1, 64)


def test_zero_shot_pipeline_scores_match_the_model(tmp_path, msclip_tokenizer_dir):
    from PIL import Image
    from transformers import pipeline

    from modeling_msclip import MSClipImageProcessor, MSClipProcessor, MSClipTokenizer

    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")).eval()
    processor = MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset("msclip", image_size=64),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = Image.fromarray(torch.randint(0, 255, (80, 96, 3), dtype=torch.uint8).numpy())
    labels = ["a red circle", "a blue square", "a green triangle"]

    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    results = classifier(image, candidate_labels=labels, hypothesis_template="a photo of {}.")
    assert sorted(r["label"] for r in results) == sorted(labels)
    assert_close_to_scale(sum(r["score"] for r in results), 1.0, 1e-5, "sum of the pipeline scores")

    inputs = processor(
        text=[f"a photo of {label}." for label in labels], images=image, return_tensors="pt", padding="max_length"
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(-1)[0]
    scores = {r["label"]: r["score"] for r in results}
    assert_close_to_scale([scores[label] for label in labels], expected, 1e-5, f"pipeline scores of {labels}")


def test_a_saved_config_with_the_removed_batch_shared_blocks_still_loads(tmp_path, caplog):
    """`batch_shared_blocks` (one call per shared component over both modalities) was removed: same outputs, slower
    on CPU, no gradient checkpointing. A config.json that still has it loads; True says that it no longer applies."""
    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset("msclip-tiny")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "batch_shared_blocks" not in saved
    (tmp_path / "config.json").write_text(json.dumps({**saved, "batch_shared_blocks": True}))
    with caplog.at_level("WARNING"):
        reloaded = MSClipModel.from_pretrained(tmp_path).eval()
    assert "batch_shared_blocks is no longer a setting" in caplog.text
    assert not hasattr(reloaded.config, "batch_shared_blocks")
    inputs = tiny_inputs(model.config, batch=2)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


# ------------------------------------------------------------------------------------------------- the heads

# The state-dict keys of the heads before they were built from `MSClipModalityModules` (issue 15, item 3), written
# out (not derived from the code under test), and their names now. Checked against the model at git 631d389.
OLD_HEAD_KEYS = {
    "separate": {
        "text_model.final_layer_norm.weight": "projection_head.final_layer_norm.text.weight",
        "text_model.final_layer_norm.bias": "projection_head.final_layer_norm.text.bias",
        "vision_model.post_layernorm.weight": "projection_head.final_layer_norm.vision.weight",
        "vision_model.post_layernorm.bias": "projection_head.final_layer_norm.vision.bias",
        "text_projection.weight": "projection_head.projection.text.weight",
        "visual_projection.weight": "projection_head.projection.vision.weight",
    },
    "shared": {  # share_projection_head=True
        "head_layer_norm.weight": "projection_head.final_layer_norm.shared.weight",
        "head_layer_norm.bias": "projection_head.final_layer_norm.shared.bias",
        "projection.weight": "projection_head.projection.shared.weight",
    },
}


def old_layout(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` with the head under its old key names (``prefix``: ``msclip.`` for MSClipForPreTraining)."""
    new_to_old = {prefix + new: prefix + old for names in OLD_HEAD_KEYS.values() for old, new in names.items()}
    renamed = {new_to_old.get(key, key): value for key, value in state.items()}
    assert len(renamed) == len(state) and renamed.keys() != state.keys()
    return renamed


def write_old_folder(model: MSClipModel | MSClipForPreTraining, folder, prefix: str = "") -> None:
    """Save ``model`` as the code before the change did: old head keys, ``share_projection_head`` in config.json."""
    model.save_pretrained(folder)
    save_file(old_layout(model.state_dict(), prefix), folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    shared = config.pop("shared_head_components")
    config.pop("shared_settings_from")
    config["share_projection_head"] = shared == list(SHAREABLE_HEAD_COMPONENTS)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("preset", "share_projection_head"), [("msclip-s-tiny", False), ("single-tower-tiny", True)])
def test_a_saved_config_with_share_projection_head_still_loads(preset, share_projection_head, tmp_path):
    model = MSClipModel(MSClipConfig.from_preset(preset))
    write_old_folder(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["share_projection_head"] is share_projection_head
    config = MSClipConfig.from_pretrained(tmp_path)
    assert config.shared_head_components == (list(SHAREABLE_HEAD_COMPONENTS) if share_projection_head else [])
    assert not hasattr(config, "share_projection_head")
    assert MSClipConfig(share_projection_head=False).shared_head_components == []
    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "share_projection_head" not in saved and saved["shared_head_components"] == config.shared_head_components


@pytest.mark.parametrize("preset", ["msclip-s-tiny", "single-tower-tiny"])
def test_checkpoints_with_the_old_head_keys_load_with_identical_outputs(preset, tmp_path):
    torch.manual_seed(0)
    model = MSClipModel(MSClipConfig.from_preset(preset)).eval()
    with torch.no_grad():  # LayerNorms away from their init, so that loading them is visible
        for name, parameter in model.named_parameters():
            if "final_layer_norm" in name:
                parameter.uniform_(0.5, 1.5)
    inputs = tiny_inputs(model.config, batch=2)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    old_keys = OLD_HEAD_KEYS["shared" if preset.startswith("single") else "separate"]
    assert set(old_keys) <= set(old_layout(model.state_dict()))

    # from_pretrained of an old folder, and what it saves: the current names.
    write_old_folder(model, tmp_path / "old")
    loaded, info = MSClipModel.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits_per_image, expected)
    loaded.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(model.state_dict())

    # plain load_state_dict, also nested in MSClipForPreTraining (keys under msclip.)
    fresh = MSClipModel(model.config).eval()
    fresh.load_state_dict(old_layout(model.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits_per_image, expected)
    pretraining = MSClipForPreTraining(model.config)
    pretraining.msclip.load_state_dict(model.state_dict())
    old_pretraining = old_layout(pretraining.state_dict(), prefix="msclip.")
    assert set(f"msclip.{key}" for key in old_keys) <= set(old_pretraining)
    reloaded = MSClipForPreTraining(model.config)
    reloaded.load_state_dict(old_pretraining, strict=True)
    with torch.no_grad():
        assert torch.equal(reloaded.msclip.eval()(**inputs).logits_per_image, expected)

    # an old MSClipForPreTraining folder into MSClipModel, and an old MSClipModel folder into the classifier
    write_old_folder(pretraining, tmp_path / "old_pretraining", prefix="msclip.")
    from_pretraining, info = MSClipModel.from_pretrained(tmp_path / "old_pretraining", output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(from_pretraining.eval()(**inputs).logits_per_image, expected)
    classifier, info = MSClipForImageClassification.from_pretrained(
        tmp_path / "old", num_labels=3, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    vision_norm = classifier.projection_head.layer_norm("vision")
    assert torch.equal(vision_norm.weight, model.projection_head.layer_norm("vision").weight)


def test_the_head_components_are_shared_one_by_one():
    """One spec for blocks and heads: a shared projection with per-tower LayerNorms is as expressible as the reverse."""
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-tiny", shared_head_components=["projection"])
    model = MSClipModel(config).eval()
    head = model.projection_head
    assert head.projection.is_shared and not head.final_layer_norm.is_shared
    assert head.project("text", torch.ones(1, 128)).shape == (1, 64)
    assert head.projection.for_modality("text") is head.projection.for_modality("vision")
    assert {key for key in model.state_dict() if key.startswith("projection_head.")} == {
        "projection_head.projection.shared.weight",
        *(f"projection_head.final_layer_norm.{m}.{p}" for m in ("text", "vision") for p in ("weight", "bias")),
    }
    with torch.no_grad():
        assert model(**tiny_inputs(config, batch=2)).logits_per_image.shape == (2, 2)


@pytest.mark.parametrize("settings_from", ["text", "vision"])
def test_shared_modules_take_the_settings_of_the_tower_the_config_names(settings_from):
    """A shared module is built from ``shared_settings_from``'s sub-config: what may still differ between the towers
    (their depth, the attention implementation given per sub-config) comes from that tower, never silently from
    text."""
    config = MSClipConfig.from_preset(
        "msclip-tiny",
        vision_config={"num_hidden_layers": 6},
        shared_components=[["attention", "mlp"]] * 6 + [[]] * 6,
        shared_head_components=["final_layer_norm", "projection"],
        shared_settings_from=settings_from,
    )
    implementations = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}
    model = MSClipModel._from_config(config, attn_implementation=implementations)
    chosen = model.config.modality_config(settings_from)
    attention = model.encoder.layers[0].self_attn["shared"]
    assert attention.config is chosen
    assert attention.config.num_hidden_layers == (12 if settings_from == "text" else 6)
    assert attention.config._attn_implementation == implementations[f"{settings_from}_config"]
    assert model.projection_head.layer_norm("text").eps == chosen.layer_norm_eps
    # Text-only blocks past the vision depth keep their own settings.
    assert model.encoder.layers[8].self_attn["text"].config is model.config.text_config
    with torch.no_grad():
        assert model(**tiny_inputs(config, batch=2)).logits_per_image.shape == (2, 2)


def test_unknown_keyword_arguments_are_refused_by_name():
    """Extra keyword arguments were dropped silently (a typo such as ``output_hidden_state=True`` did nothing)."""
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-tiny")
    model = MSClipModel(config).eval()
    inputs = tiny_inputs(config, batch=2)
    with pytest.raises(
        TypeError, match=r"MSClipModel.forward got unexpected keyword argument\(s\) \['output_hidden_state'\]"
    ):
        model(**inputs, output_hidden_state=True)
    with pytest.raises(TypeError, match=r"get_text_features got unexpected keyword argument\(s\) \['pixel_values'\]"):
        model.get_text_features(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(TypeError, match=r"get_image_features got unexpected keyword argument\(s\) \['mask'\]"):
        model.get_image_features(inputs["pixel_values"], mask=None)
    hidden = model.get_image_features(inputs["pixel_values"], output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) > 1
