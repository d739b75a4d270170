"""run_pretrain.py plus a test hook, launched by tests/test_pretraining_distributed.py (kill-and-resume runs are in
tests/test_preemption.py).

Environment:
    PROBE_OUTPUT=path    after training, run every rank's model on a fixed probe batch in eval mode and save the
                         rank-0 outputs to ``path`` (under ZeRO-3 every rank must take part in the forward).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_msclip.pretraining_msclip import parse_pretraining_arguments, run_pretraining  # noqa: E402


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
    trainer = run_pretraining(*parse_pretraining_arguments())
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
