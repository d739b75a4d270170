"""Every trainable parameter gets a gradient in one training step, for every tiny preset and objective.

`run_pretraining` turns off DDP's search for unused parameters (``ddp_find_unused_parameters=False``), which costs a
graph traversal per step; this is what makes that safe: with an unused parameter DDP would hang or raise.
"""

import pytest
import torch

from modeling_msclip import MSClipConfig, MSClipForPreTraining
from modeling_msclip.trainer_msclip import MSClipTrainingArguments
from training.run_pretrain import DataArguments, ModelArguments, run_pretraining

TINY_PRESETS = ["clip-tiny", "msclip-tiny", "msclip-s-tiny", "msclip-s-b16-tiny", "single-tower-tiny"]
OBJECTIVES = {
    "clip": {},
    "siglip": {},
    "nclip": {"nclip_num_prototypes": 64, "nclip_hidden_dim": 32, "nclip_bottleneck_dim": 16},
    "xclip": {"nclip_num_prototypes": 64, "nclip_hidden_dim": 32, "nclip_bottleneck_dim": 16},
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_parameter_gets_a_gradient(preset, objective):
    config = MSClipConfig.from_preset(preset, objective={"loss": objective, **OBJECTIVES[objective]})
    torch.manual_seed(0)
    model = MSClipForPreTraining(config).train()
    size = config.vision_config.image_size
    input_ids = torch.zeros(4, 8, dtype=torch.long)
    input_ids[:, 0], input_ids[:, 1:6], input_ids[:, 6] = 49406, torch.randint(1, 49000, (4, 5)), 49407
    model(input_ids=input_ids, pixel_values=torch.randn(4, 3, size, size)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{preset}/{objective}: parameters without a gradient: {missing[:10]}"


def test_pretraining_turns_off_the_unused_parameter_search_unless_asked(tmp_path, msclip_tokenizer_dir):
    from processing.shapes_dataset import ShapesConfig, write_shapes_dataset

    write_shapes_dataset(
        tmp_path / "data", num_train=8, num_validation=2, num_test=2, config=ShapesConfig(image_size=64)
    )
    for requested, expected in ((None, False), (True, True)):
        args = MSClipTrainingArguments(
            output_dir=str(tmp_path / f"out-{requested}"),
            ddp_find_unused_parameters=requested,
            max_steps=1,
            per_device_train_batch_size=4,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
        )
        model_args = ModelArguments(model_preset="clip-tiny", tokenizer_name_or_path=str(msclip_tokenizer_dir))
        data_args = DataArguments(train_data=str(tmp_path / "data"), train_split="train")
        trainer = run_pretraining(model_args, data_args, args)
        assert trainer.args.ddp_find_unused_parameters is expected
        assert trainer.state.global_step == 1
