"""transformers' CLIPModel <-> MSClipModel: the same features for any vocabulary and end-token id, both ways.

transformers' CLIP pools text at the first ``eos_token_id`` (at ``argmax(input_ids)`` for legacy configs with
``eos_token_id=2``); the converted model must pool at the same token, also when the end token is not the largest id
and the captions hold larger ids, and when the tokenizer pads with the end token.
"""

import logging

import pytest
import torch
from conftest import REFERENCE_DIR, assert_close_to_scale, needs_reference
from transformers import CLIPConfig, CLIPModel

from modeling_msclip import MSClipModel
from modeling_msclip.convert_clip import config_from_clip, convert, convert_clip_state_dict
from modeling_msclip.convert_clip import main as convert_clip_main
from modeling_msclip.convert_to_clip import convert_to_clip
from modeling_msclip.pretraining_msclip import align_text_config_with_tokenizer

VOCAB, END = 1000, 500


def tiny_clip(eos_token_id: int, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": VOCAB, "bos_token_id": 499, "eos_token_id": eos_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def captions_with_ids_above_the_end(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, ids in 501..999 and below, end, padding]: the end token is never the row's largest id."""
    generator = torch.Generator().manual_seed(1)
    lengths = [4, 9, 12]
    input_ids = torch.full((3, 12), pad_id, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = 499
        input_ids[row, 1 : length - 1] = torch.randint(501, VOCAB, (length - 2,), generator=generator)
        input_ids[row, 1] = 3  # and a small id
        input_ids[row, length - 1] = END
    attention_mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    return input_ids, attention_mask


@pytest.mark.parametrize("pad_id", [0, END], ids=["pad-0", "pad-with-end"])
def test_converted_clip_pools_at_the_first_end_token(tmp_path, pad_id):
    clip = tiny_clip(eos_token_id=END)
    clip.save_pretrained(tmp_path / "clip")
    model = convert(tmp_path / "clip", tmp_path / "msclip")
    assert model.config.text_config.pooling == "eos"
    reloaded = MSClipModel.from_pretrained(tmp_path / "msclip").eval()
    input_ids, attention_mask = captions_with_ids_above_the_end(pad_id)
    assert (input_ids.argmax(-1) != (input_ids == END).int().argmax(-1)).all()  # argmax pooling would be wrong
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        for ours_model in (model, reloaded):
            ours = ours_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
            assert_close_to_scale(ours.text_embeds, theirs.text_embeds, 1e-5, "text_embeds")
            assert_close_to_scale(ours.logits_per_image, theirs.logits_per_image, 1e-5, "logits_per_image")


def test_legacy_clip_config_keeps_argmax_pooling(tmp_path):
    # Configs saved before transformers set eos_token_id carry 2, and transformers pools those at argmax(input_ids).
    clip = tiny_clip(eos_token_id=2)
    clip.save_pretrained(tmp_path / "clip")
    model = convert(tmp_path / "clip")
    assert model.config.text_config.pooling == "argmax"
    input_ids, attention_mask = captions_with_ids_above_the_end(0)
    with torch.no_grad():
        theirs = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        ours = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    assert_close_to_scale(ours, theirs, 1e-5, "legacy text features")


def test_rows_without_the_end_token_are_refused_under_eos_pooling(tmp_path):
    clip = tiny_clip(eos_token_id=END)
    clip.save_pretrained(tmp_path / "clip")
    model = convert(tmp_path / "clip")
    input_ids, _ = captions_with_ids_above_the_end(0)
    input_ids[1, 8] = 7  # row 1 loses its end token
    with pytest.raises(ValueError, match=r"rows \[1\] have no end token \(eos_token_id 500\)"):
        model.get_text_features(input_ids=input_ids)


def test_converters_say_when_no_processor_is_written_and_take_a_tokenizer(tmp_path, caplog, msclip_tokenizer_dir):
    from transformers import AutoProcessor

    clip = tiny_clip(eos_token_id=END)
    clip.save_pretrained(tmp_path / "clip")  # a model folder without processor files
    with caplog.at_level(logging.WARNING, logger="modeling_msclip.convert_original_msclip"):
        convert(tmp_path / "clip", tmp_path / "bare")
    assert "holds the model but no processor" in caplog.text and "--vocab" in caplog.text
    assert not (tmp_path / "bare" / "tokenizer_config.json").exists()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_msclip.convert_original_msclip"):
        convert_clip_main(
            ["--input", str(tmp_path / "clip"), "--output", str(tmp_path / "full")]
            + ["--vocab", str(msclip_tokenizer_dir)]
        )
    assert "no processor" not in caplog.text
    processor = AutoProcessor.from_pretrained(tmp_path / "full")
    assert processor.image_processor.crop_size.height == 32


@needs_reference
def test_official_converter_without_vocab_warns(tmp_path, caplog):
    from modeling_msclip.convert_original_msclip import main as convert_official_main

    reference = REFERENCE_DIR / "msclip_s_tiny"
    arguments = ["--config", str(reference / "config.json"), "--checkpoint", str(reference / "state_dict.safetensors")]
    with caplog.at_level(logging.WARNING, logger="modeling_msclip.convert_original_msclip"):
        convert_official_main([*arguments, "--output", str(tmp_path / "out")])
    assert "holds the model but no processor" in caplog.text


def test_missing_input_folders_are_named_before_any_hub_lookup(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no-such-clip is not a directory"):
        convert(tmp_path / "no-such-clip")
    with pytest.raises(SystemExit) as exit_info:
        convert_clip_main(["--input", str(tmp_path / "no-such-clip"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no-such-clip is not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ MSClipModel -> transformers CLIP


def test_export_to_clip_computes_the_same_outputs_and_round_trips(tmp_path, msclip_tokenizer_dir):
    from transformers import AutoProcessor

    from modeling_msclip import MSClipConfig, MSClipImageProcessor, MSClipProcessor, MSClipTokenizer
    from modeling_msclip.convert_to_clip import main as export_main

    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    config = MSClipConfig.from_preset("clip-tiny")  # nothing shared, official argmax pooling
    align_text_config_with_tokenizer(config, tokenizer, resize=True)
    torch.manual_seed(0)
    ours = MSClipModel(config).eval()
    ours.save_pretrained(tmp_path / "ours")
    MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=64), tokenizer).save_pretrained(
        tmp_path / "ours"
    )
    export_main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "clip")])
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    assert AutoProcessor.from_pretrained(tmp_path / "clip", trust_remote_code=True)(text="a red")["input_ids"]

    inputs = tokenizer(["a small green picture", "there is a star", "hello world on the left!"], return_tensors="pt")
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(**inputs, pixel_values=pixel_values)
        exported = clip(**inputs, pixel_values=pixel_values)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert_close_to_scale(getattr(exported, name), getattr(expected, name), 1e-5, name)

    # CLIP -> MS-CLIP -> CLIP gives back every tensor of the original bit for bit.
    original = tiny_clip(eos_token_id=END)
    converted = MSClipModel(config_from_clip(original.config))
    converted.load_state_dict(convert_clip_state_dict(original.state_dict(), converted.config))
    back = convert_to_clip(converted)
    assert back.config.text_config.eos_token_id == END
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_refuses_what_clip_cannot_express(tmp_path):
    from modeling_msclip import MSClipConfig

    with pytest.raises(ValueError, match="share components between the towers.*parallel branch"):
        convert_to_clip(MSClipModel(MSClipConfig.from_preset("msclip-s-tiny")))
    with pytest.raises(ValueError, match=r"share head components \['final_layer_norm', 'projection'\].*bidirectional"):
        convert_to_clip(MSClipModel(MSClipConfig.from_preset("single-tower-tiny")))
    with pytest.raises(ValueError, match=r"share head components \['projection'\]$"):
        convert_to_clip(MSClipModel(MSClipConfig.from_preset("clip-tiny", shared_head_components=["projection"])))


def test_export_refuses_a_processor_whose_end_id_is_not_the_models(tmp_path, msclip_tokenizer_dir, capsys):
    from modeling_msclip import MSClipConfig, MSClipImageProcessor, MSClipProcessor, MSClipTokenizer
    from modeling_msclip.convert_to_clip import main as export_main

    MSClipModel(MSClipConfig.from_preset("clip-tiny")).save_pretrained(tmp_path / "ours")  # end id 49407
    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)  # end id 599
    MSClipProcessor(MSClipImageProcessor.from_preset("msclip", image_size=64), tokenizer).save_pretrained(
        tmp_path / "ours"
    )
    with pytest.raises(SystemExit):
        export_main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "clip")])
    assert "end id 599 is not the model's eos_token_id 49407" in capsys.readouterr().err
    assert not (tmp_path / "clip").exists()
