"""Real models in and out of TinyGPT: GPT-2 (Hugging Face's format) and nanoGPT checkpoints
imported as ordinary runs, and runs exported to GPT-2's format, with their tokenizers.

`layout` maps GPT-2's tensor names onto TinyGPT's; `hf` and `nanogpt` read (and `hf` writes) each
format; `vocab` brings the tokenizers along; `convert` does whole imports and exports.
"""

from tinygpt.interop.convert import (
    Imported,
    default_run_name,
    export_checkpoint,
    import_checkpoint,
    read_source,
)
from tinygpt.interop.hf import export_hf, read_hf
from tinygpt.interop.layout import InteropError
from tinygpt.interop.nanogpt import read_meta, read_nanogpt

__all__ = ["Imported", "InteropError", "default_run_name", "export_checkpoint", "export_hf",
           "import_checkpoint", "read_hf", "read_meta", "read_nanogpt", "read_source"]
