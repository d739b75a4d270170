"""MS-CLIP processor: one object that tokenises captions and preprocesses images for ``MSClipModel``.

This file must only import the standard library, ``transformers`` and its sibling processing files: it is copied
next to saved checkpoints and imported by ``trust_remote_code=True`` where ``modeling_msclip`` is absent.
"""

# No `from __future__ import annotations` here: transformers reads the TypedDict annotations below at runtime.
import os
from pathlib import Path
from typing import Any, Literal

from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs

from .image_processing_msclip import MSClipImageProcessor
from .tokenization_msclip import MSClipTokenizer, build_msclip_tokenizer


class MSClipTextKwargs(TextKwargs, total=False):
    """Text options of ``MSClipProcessor``: transformers' ``TextKwargs`` plus the truncation style.

    Attributes:
        truncation_style: ``"keep_end"`` (over-length captions keep their end token) or ``"official"`` (reproduce
            the official rows, which lose it).
    """

    truncation_style: Literal["keep_end", "official"] | None


class MSClipProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments accepted by ``MSClipProcessor.__call__``, grouped per modality."""

    text_kwargs: MSClipTextKwargs


class MSClipProcessor(ProcessorMixin):
    """Wraps an ``MSClipImageProcessor`` and an ``MSClipTokenizer`` into a single processor.

    ``processor(text=captions, images=images, return_tensors="pt")`` returns ``input_ids`` and ``attention_mask``
    (padded to the longest caption by default, see ``MSClipTokenizer``) and ``pixel_values``. Either input may be
    omitted. Text options (``padding``, ``truncation``, ``max_length``, ``truncation_style``) and image options are
    passed through to the tokenizer and the image processor.

    Args:
        image_processor: the image processor; ``MSClipImageProcessor()`` (MS-CLIP preset, 224 px) if omitted.
        tokenizer: the tokenizer; required (build one with ``build_msclip_tokenizer``).
    """

    valid_processor_kwargs = MSClipProcessorKwargs
    # Saving writes `auto_map` and copies this file (and its siblings) next to the checkpoint.
    _auto_class = "AutoProcessor"

    def __init__(
        self, image_processor: MSClipImageProcessor | None = None, tokenizer: MSClipTokenizer | None = None, **kwargs
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "MSClipProcessor needs a tokenizer: build one with build_msclip_tokenizer(vocab_path) or load one "
                "with MSClipTokenizer.from_pretrained(directory)"
            )
        if image_processor is None:
            image_processor = MSClipImageProcessor()
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Load the processor of a saved folder.

        ``AutoProcessor.from_pretrained`` on a local folder that holds an image processor but no tokenizer (an image
        classifier's folder, as fine-tuning writes it) returns that `MSClipImageProcessor`, as transformers'
        ``AutoProcessor`` does for image-only models; called directly, such a folder is a ``ValueError`` that says
        so.
        """
        if kwargs.get("_from_auto") and image_processor_only(pretrained_model_name_or_path, kwargs.get("subfolder")):
            kwargs.pop("trust_remote_code", None)
            return MSClipImageProcessor.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, processor_dict: dict | None = None, **kwargs
    ) -> list:
        """Load both sub-processors with their own classes, so that ``MSClipProcessor.from_pretrained`` works
        without Auto-class registration or ``trust_remote_code``."""
        if image_processor_only(pretrained_model_name_or_path, kwargs.get("subfolder")):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds an image processor but no tokenizer (an image classifier's "
                "folder): load it with MSClipImageProcessor.from_pretrained or AutoImageProcessor.from_pretrained"
            )
        # The classes are known here; the flag only matters to the Auto classes.
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("subfolder", None)
        image_processor = MSClipImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = MSClipTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]


# Files of a saved tokenizer (MSClipTokenizer writes the first two; a CLIP tokenizer folder has the last two).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def image_processor_only(folder: str | os.PathLike, subfolder: str | None = None) -> bool:
    """Whether ``folder`` is a local folder with an image-processor file and no tokenizer file (an image
    classifier's folder). Hub ids and other sources are never image-only here."""
    path = Path(folder) / (subfolder or "")
    if not path.is_dir():
        return False
    has_image_processor = any((path / name).is_file() for name in IMAGE_PROCESSOR_FILES)
    return has_image_processor and not any((path / name).is_file() for name in TOKENIZER_FILES)


def build_msclip_processor(
    tokenizer_source: str | os.PathLike, preset: str = "msclip", image_size: int = 224, **tokenizer_kwargs: Any
) -> MSClipProcessor:
    """A processor from a tokenizer source and an image preset (``"msclip"``: ImageNet statistics, ``"clip"``).

    ``tokenizer_source`` is anything ``build_msclip_tokenizer`` takes: the CLIP BPE file, a CLIP tokenizer folder
    (``vocab.json`` + ``merges.txt``) or a saved ``MSClipTokenizer`` folder.
    """
    return MSClipProcessor(
        image_processor=MSClipImageProcessor.from_preset(preset, image_size=image_size),
        tokenizer=build_msclip_tokenizer(tokenizer_source, **tokenizer_kwargs),
    )


def remote_code_files() -> list[Path]:
    """Python files that must sit next to a saved checkpoint for ``trust_remote_code=True`` loading of the
    tokenizer, the image processor and the processor.

    ``save_pretrained`` of each of the three classes already copies its own file (and the processor copies all
    three); a model save that wants the processing classes available as well copies these files too.

    Returns:
        Absolute paths of ``tokenization_msclip.py``, ``image_processing_msclip.py`` and ``processing_msclip.py``.
    """
    package_dir = Path(__file__).resolve().parent
    return [
        package_dir / "tokenization_msclip.py",
        package_dir / "image_processing_msclip.py",
        package_dir / "processing_msclip.py",
    ]


__all__ = [
    "MSClipProcessor",
    "MSClipProcessorKwargs",
    "MSClipTextKwargs",
    "build_msclip_processor",
    "image_processor_only",
    "remote_code_files",
]
