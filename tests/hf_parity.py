"""The README's parity table: each architecture of tests/test_hf.py, imported with lm.hf and compared with
transformers.

    python tests/hf_parity.py [--initializer_range=0.1]

Per model: the largest fp32 logit difference on two 512-token prompts, absolute and relative to the largest logit,
next to how far transformers' two attention implementations (eager, which the tests compare with, and sdpa) are
from each other, relative to the largest logit: the spread of float32 rounding between two correct programs;
whether 32 greedy tokens match; whether HF -> lm -> HF gives the same tensors bit for bit. `--initializer_range`
builds the models with other weight scales than transformers' default (0.02).
"""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import test_hf  # noqa: E402
from lm import checkpoint  # noqa: E402
from lm import generate as generate_lib  # noqa: E402
from lm.hf import convert  # noqa: E402


def main() -> None:
    scale = next((float(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--initializer_range=")), None)
    print("| model | max logit error | relative to largest logit | transformers eager vs sdpa, relative | "
          "32 greedy tokens | HF -> lm -> HF |")
    print("|---|---|---|---|---|---|")
    for name in test_hf.MODELS:
        if scale is not None:
            config_class, kwargs = test_hf.MODELS[name]
            test_hf.MODELS[name] = (config_class, {**kwargs, "initializer_range": scale})
        with tempfile.TemporaryDirectory() as root:
            directory = os.path.join(root, "hf")
            model = test_hf.save_hf_model(name, directory, test_hf.make_tokenizer(name))
            workdir = os.path.join(root, "workdir")
            convert.import_checkpoint(directory, workdir, test_hf.FP32)
            restored = checkpoint.restore(workdir)
            tokens_bt = test_hf.prompt_tokens()
            expected = test_hf.hf_logits(model, tokens_bt)
            sdpa = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
            spread = np.abs(test_hf.hf_logits(sdpa, tokens_bt) - expected).max()
            got = test_hf.lm_logits(restored.config, restored.params, tokens_bt)
            error, largest = np.abs(got - expected).max(), np.abs(expected).max()
            prompt_bt = test_hf.prompt_tokens(length=12, batch=1, seed=1)
            with torch.no_grad():
                greedy = model.generate(torch.tensor(prompt_bt), max_new_tokens=32, do_sample=False,
                                        min_new_tokens=32, pad_token_id=0)[0, 12:].tolist()
            ours = generate_lib.generate(restored.config, restored.params, prompt_bt.tolist(), max_new_tokens=32,
                                         sampling=generate_lib.Sampling(0.0, 0, 1.0), seed=0, eos_id=None, pad_id=0)
            out = os.path.join(root, "exported")
            bare = os.path.join(root, "bare")
            convert.import_checkpoint(directory, bare)
            convert.export_checkpoint(bare, out, max_shard_bytes=100_000)
            original, exported = test_hf.read_all(directory), test_hf.read_all(out)
            identical = sorted(original) == sorted(exported) and all(
                np.array_equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)
            print(f"| {name} | {error:.2e} | {error / largest:.2e} | {spread / largest:.2e} | "
                  f"{'identical' if ours[0] == greedy else 'DIFFERENT'} | "
                  f"{'bit-identical' if identical else 'DIFFERENT'} |", flush=True)


if __name__ == "__main__":
    main()
