"""run_pretrain.py plus test hooks, launched by tests/test_pretraining_distributed.py (kill-and-resume runs are in
tests/test_preemption.py).

Environment:
    PROBE_OUTPUT=path    after training, run every rank's model on a fixed probe batch in eval mode and save the
                         rank-0 outputs to ``path`` (under ZeRO-3 every rank must take part in the forward).
    PARAMS_OUTPUT=dir    save the full state dict (parameters and buffers, gathered under ZeRO-3) as
                         ``dir/step-<k>.pt`` from rank 0 after every optimizer step k, and ``dir/step-0.pt`` before the
                         first (the model every rank trains from).
    DOUBLE_SHARED_GRAD=1 a deliberate gradient bug: on rank 0 the gradient of every parameter shared by both towers
                         is doubled before it is reduced over ranks (a tensor hook runs before DDP's and ZeRO's
                         reduction hooks), so the tests can show that their comparison catches such a bug.
"""

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_msclip.trainer_msclip import is_shared_parameter  # noqa: E402
from training.run_pretrain import parse_arguments, run_pretraining  # noqa: E402


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole: under ZeRO-3 (parameters carry ``ds_id``) all ranks gather them."""
    parameters = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not parameters:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class SaveParameters(TrainerCallback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def save(self, args, model, step: int) -> None:
        state = full_state_dict(model)  # a collective under ZeRO-3: every rank takes part
        if args.process_index == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.folder / f"step-{step}.pt")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.save(args, model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.save(args, model, state.global_step)


class DoubleSharedGradient(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index != 0:
            return
        for name, parameter in model.named_parameters():
            if is_shared_parameter(name) and parameter.requires_grad:
                parameter.register_hook(lambda grad: grad * 2)


def probe_batch(text_config) -> dict[str, torch.Tensor]:
    """Four captions of the model's own id range (the run's tokenizer sizes the vocabulary, here not CLIP's)."""
    generator = torch.Generator().manual_seed(123)
    start, end = text_config.bos_token_id, text_config.eos_token_id
    input_ids = torch.zeros(4, 12, dtype=torch.long)
    input_ids[:, 0] = start
    input_ids[:, 1:9] = torch.randint(1, min(start, end), (4, 8), generator=generator)
    input_ids[:, 9] = end
    return {"input_ids": input_ids, "pixel_values": torch.randn(4, 3, 64, 64, generator=generator)}


def main() -> None:
    callbacks: list[TrainerCallback] = []
    if os.environ.get("PARAMS_OUTPUT"):
        callbacks.append(SaveParameters(os.environ["PARAMS_OUTPUT"]))
    if os.environ.get("DOUBLE_SHARED_GRAD") == "1":
        callbacks.append(DoubleSharedGradient())
    trainer = run_pretraining(*parse_arguments(), callbacks=callbacks)
    if os.environ.get("PROBE_OUTPUT"):
        model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        model.eval()
        text_config = trainer.model.config.text_config
        batch = {k: v.to(trainer.args.device) for k, v in probe_batch(text_config).items()}
        with torch.no_grad():
            outputs = model(**batch, return_loss=False)
        if trainer.is_world_process_zero():
            torch.save(
                {
                    "image_embeds": outputs.image_embeds.cpu(),
                    "text_embeds": outputs.text_embeds.cpu(),
                    "logits_per_image": outputs.logits_per_image.cpu(),
                    "batch": probe_batch(text_config),
                },
                os.environ["PROBE_OUTPUT"],
            )


if __name__ == "__main__":
    main()
