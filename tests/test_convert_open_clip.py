"""open_clip -> MSClipModel, checked against an independent forward of open_clip's documented computation.

open_clip itself cannot be installed here (it imports torchvision, which has no wheel beside this torch), so the test
builds checkpoints in open_clip's documented key layout (OpenAI CLIP's parameter names) and runs them through a plain
torch forward written from that documentation: ``F.multi_head_attention_forward`` on ``in_proj_weight``, pre-LN
residual blocks, class-token pooling after ``ln_post``, text pooled at ``argmax(input_ids)`` after ``ln_final``.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale
from safetensors.torch import save_file

from modeling_msclip import MSClipModel
from modeling_msclip.convert_open_clip import convert, main

SIZES = {"vision_width": 64, "head_width": 32, "text_width": 32, "text_heads": 2, "layers": 2, "embed": 16}
VOCAB, PATCH, IMAGE = 300, 8, 32


def model_config(context_length: int, quick_gelu: bool) -> dict:
    return {
        "embed_dim": SIZES["embed"],
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": IMAGE,
            "layers": SIZES["layers"],
            "width": SIZES["vision_width"],
            "head_width": SIZES["head_width"],
            "patch_size": PATCH,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": VOCAB,
            "width": SIZES["text_width"],
            "heads": SIZES["text_heads"],
            "layers": SIZES["layers"],
        },
    }


def random_checkpoint(context_length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's CLIP parameter names and shapes."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    state = {}

    def blocks(prefix: str, width: int) -> None:
        for layer in range(SIZES["layers"]):
            p = f"{prefix}.resblocks.{layer}."
            state.update(
                {
                    p + "ln_1.weight": 1 + tensor(width),
                    p + "ln_1.bias": tensor(width),
                    p + "attn.in_proj_weight": tensor(3 * width, width),
                    p + "attn.in_proj_bias": tensor(3 * width),
                    p + "attn.out_proj.weight": tensor(width, width),
                    p + "attn.out_proj.bias": tensor(width),
                    p + "ln_2.weight": 1 + tensor(width),
                    p + "ln_2.bias": tensor(width),
                    p + "mlp.c_fc.weight": tensor(4 * width, width),
                    p + "mlp.c_fc.bias": tensor(4 * width),
                    p + "mlp.c_proj.weight": tensor(width, 4 * width),
                    p + "mlp.c_proj.bias": tensor(width),
                }
            )

    text, vision, embed = SIZES["text_width"], SIZES["vision_width"], SIZES["embed"]
    grid = (IMAGE // PATCH) ** 2
    state.update(
        {
            "token_embedding.weight": tensor(VOCAB, text),
            "positional_embedding": tensor(context_length, text),
            "ln_final.weight": 1 + tensor(text),
            "ln_final.bias": tensor(text),
            "text_projection": tensor(text, embed),
            "logit_scale": torch.tensor(2.6592),
            "visual.class_embedding": tensor(vision),
            "visual.positional_embedding": tensor(grid + 1, vision),
            "visual.conv1.weight": tensor(vision, 3, PATCH, PATCH),
            "visual.ln_pre.weight": 1 + tensor(vision),
            "visual.ln_pre.bias": tensor(vision),
            "visual.ln_post.weight": 1 + tensor(vision),
            "visual.ln_post.bias": tensor(vision),
            "visual.proj": tensor(vision, embed),
        }
    )
    blocks("transformer", text)
    blocks("visual.transformer", vision)
    return state


def documented_forward(state, input_ids, pixel_values, heads_text, heads_vision, quick_gelu):
    """open_clip's CLIP forward for ViT towers, from its documented computation (sequence-first attention)."""

    def activation(x):
        return x * torch.sigmoid(1.702 * x) if quick_gelu else F.gelu(x)

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], 1e-5)

    def transformer(x, prefix, heads, mask):
        x = x.transpose(0, 1)  # (length, batch, width)
        width = x.shape[-1]
        for layer in range(SIZES["layers"]):
            p = f"{prefix}.resblocks.{layer}."
            h = layer_norm(x, p + "ln_1")
            attended, _ = F.multi_head_attention_forward(
                h, h, h, width, heads,
                state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"], None, None, False, 0.0,
                state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"],
                need_weights=False, attn_mask=mask,
            )  # fmt: skip
            x = x + attended
            h = layer_norm(x, p + "ln_2")
            h = F.linear(activation(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
                         state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])  # fmt: skip
            x = x + h
        return x.transpose(0, 1)

    length = input_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = state["token_embedding.weight"][input_ids] + state["positional_embedding"][:length]
    x = layer_norm(transformer(x, "transformer", heads_text, causal), "ln_final")
    text = x[torch.arange(len(input_ids)), input_ids.argmax(-1)] @ state["text_projection"]

    patches = F.conv2d(pixel_values, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(len(pixel_values), 1, -1)
    x = torch.cat([cls, patches], dim=1) + state["visual.positional_embedding"]
    x = transformer(layer_norm(x, "visual.ln_pre"), "visual.transformer", heads_vision, None)
    image = layer_norm(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    return image, text


def inputs(context_length: int):
    generator = torch.Generator().manual_seed(5)
    lengths = [3, 7, context_length]
    input_ids = torch.zeros(3, context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = VOCAB - 2
        input_ids[row, 1 : length - 1] = torch.randint(1, VOCAB - 2, (length - 2,), generator=generator)
        input_ids[row, length - 1] = VOCAB - 1
    return input_ids, torch.randn(3, 3, IMAGE, IMAGE, generator=generator)


@pytest.mark.parametrize(("context_length", "quick_gelu"), [(12, True), (20, False)])
@pytest.mark.parametrize("layout", ["safetensors", "nested-pt", "custom-text"])
def test_open_clip_checkpoint_gives_the_documented_outputs(tmp_path, context_length, quick_gelu, layout):
    state = random_checkpoint(context_length)
    (tmp_path / "config.json").write_text(json.dumps(model_config(context_length, quick_gelu)))
    if layout == "safetensors":
        checkpoint = tmp_path / "open_clip_model.safetensors"
        save_file(state, checkpoint)
    else:
        checkpoint = tmp_path / "epoch_3.pt"
        stored = {("text." + k if layout == "custom-text" and not k.startswith(("visual.", "logit")) else k): v
                  for k, v in state.items()}  # fmt: skip
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in stored.items()}}, checkpoint)
    main(["--checkpoint", str(checkpoint), "--model-config", str(tmp_path / "config.json"), "--output",
          str(tmp_path / "out")])  # fmt: skip
    model = MSClipModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    input_ids, pixel_values = inputs(context_length)
    heads_vision = SIZES["vision_width"] // SIZES["head_width"]
    with torch.no_grad():
        image, text = documented_forward(state, input_ids, pixel_values, SIZES["text_heads"], heads_vision, quick_gelu)
        ours = model(input_ids=input_ids, pixel_values=pixel_values)
    assert_close_to_scale(ours.image_embeds, F.normalize(image, dim=-1), 1e-5, "image_embeds")
    assert_close_to_scale(ours.text_embeds, F.normalize(text, dim=-1), 1e-5, "text_embeds")
    expected_logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T * state["logit_scale"].exp()
    assert_close_to_scale(ours.logits_per_image, expected_logits, 1e-5, "logits_per_image")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vision_cfg": {"ls_init_value": 1e-5}}, "ls_init_value"),
        ({"text_cfg": {"hf_model_name": "roberta-base"}}, "roberta-base"),
        ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool"),
        ({"text_cfg": {"no_causal_mask": True}}, "no_causal_mask"),
        ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ResNet vision towers"),
        ({"init_logit_bias": -10}, "SigLIP"),
    ],
)
def test_unsupported_open_clip_settings_are_refused_by_name(tmp_path, change, message):
    config = model_config(12, True)
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(random_checkpoint(12), tmp_path / "model.safetensors")
    with pytest.raises(Exception, match=message):
        convert(tmp_path / "model.safetensors", tmp_path / "config.json")


def test_missing_files_are_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(model_config(12, True)))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "none.pt"), "--model-config", str(tmp_path / "config.json"),
              "--output", str(tmp_path / "out")])  # fmt: skip
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="open_clip model config not found"):
        convert(tmp_path / "none.pt", tmp_path / "missing.json")


def test_a_checkpoint_that_does_not_fit_its_config_is_named_tensor_by_tensor(tmp_path, capsys):
    """A vocabulary size in the config that differs from the checkpoint's (found running README's command with a
    mismatched pair) was torch's load_state_dict traceback; now an error naming the tensor, both shapes and the file."""
    config = model_config(12, True)
    config["text_cfg"]["vocab_size"] = VOCAB + 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(random_checkpoint(12), tmp_path / "model.safetensors")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "model.safetensors"), "--model-config", str(tmp_path / "config.json"),
              "--output", str(tmp_path / "out")])  # fmt: skip
    error = capsys.readouterr().err
    assert "does not fit the model config" in error
    assert f"text_model.embeddings.token_embedding.weight: ({VOCAB}, 32) in the checkpoint, ({VOCAB + 8}, 32)" in error
    assert not (tmp_path / "out").exists()
