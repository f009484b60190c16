"""Hugging Face interop: Llama-family, Mistral, Qwen2, GPT-2 and DeepSeek-V3 (MLA + mixture of experts) checkpoints in
and out of lm.

    python -m lm.hf import --hf=DIR_OR_HUB_ID --workdir=W [--config.a.b=value ...]
    python -m lm.hf export --workdir=W [--step=N] --out=DIR

In Python: `lm.hf.import_checkpoint(source, workdir, overrides)` and `lm.hf.export_checkpoint(workdir, out)`
(`lm.hf.convert`). `lm.hf.architectures` maps configs and weight names, `lm.hf.weights` moves the tensors a slice at
a time between safetensors files and sharded parameters.
"""

from lm.hf.convert import export_checkpoint, import_checkpoint

__all__ = ["export_checkpoint", "import_checkpoint"]
