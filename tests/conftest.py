"""Fixtures shared by several test files. Keep this file small: one-file fixtures belong in their test file.

SHARED_DIR is the read-only reference material next to the repository (../shared); tests read it, never copy it.
"""

import socket
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
CLIP_VOCAB = SHARED_DIR / "reference" / "msclip_official" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="session")
def msclip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MS-CLIP tokenizer directory, built once per session from the shared CLIP BPE vocabulary."""
    from modeling_msclip.tokenization_msclip import build_msclip_tokenizer

    if not CLIP_VOCAB.is_file():
        raise FileNotFoundError(f"The shared CLIP BPE vocabulary is missing: {CLIP_VOCAB}")
    output_dir = tmp_path_factory.mktemp("msclip_tokenizer")
    build_msclip_tokenizer(CLIP_VOCAB).save_pretrained(output_dir)
    return output_dir


def build_tiny_transformers_clip(words: list[str]):
    """A real, randomly initialised transformers `CLIPModel` (2 layers, width 32, 32 px) with a word-level tokenizer
    over ``words`` and a PIL image processor: a stand-in with CLIP's output structure for the evaluation tests."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16
    )
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    model = CLIPModel(config)
    model.set_attn_implementation("eager")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, image_processor


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for gloo rendezvous and accelerate launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
