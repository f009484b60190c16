"""DPO, a reward model and PPO on one synthetic preference task, from the same small SFT base: the README's curves.

    python -m lm.bench.rlhf --root=/tmp/rlhf [--plot=notebooks/images/rlhf.png]

The task (`write_task`): prompts `Q: a+b?\\nA:`; the base is fine-tuned on answers that say `hello` 15% of the time
(one of three `hello` answers, `GOOD`) and otherwise one of three others (`BAD`), so its greedy answers never say
`hello` and its samples do about 15% of the time. Preference pairs prefer a `hello` answer; held-out pairs and prompts
are sums of numbers the training prompts never have. `says_hello` is the verifiable reward PPO maximises.

It trains, in `--root`: the base (SFT, 60 steps), full-parameter DPO (with TRL's "sft" term, 60 steps), a reward
model (30 steps), PPO on `says_hello` (16 rollout batches) and PPO on the reward model's score (8). It prints each
run's curve and the held-out measures (DPO's reward accuracy and greedy hello rate; the reward model's pairwise
accuracy) and plots the curves. `tests/test_rlhf.py` runs the same task and asserts the issue's thresholds.
"""

from __future__ import annotations

import io
import json
import os
import random

from absl import flags
import numpy as np

GOOD = (" hello", " hello there", " it is hello")
BAD = (" hi", " hi there", " it is 4")
TRAIN_SUMS = [(a, b) for a in range(10) for b in range(10)]
HELD_OUT_SUMS = [(a, b) for a in range(10, 20) for b in range(10, 14)]
REWARD_FN = "lm.bench.rlhf:says_hello"


def prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}?\nA:"


def says_hello(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for a completion that says `hello`, else 0 (`config.rl.reward_fn = REWARD_FN`)."""
    return [float("hello" in completion) for completion in completions]


def _write(path: str, records) -> str:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs(sums, seed: int) -> list[dict]:
    draw = random.Random(seed)
    return [{"prompt": prompt(a, b), "chosen": draw.choice(GOOD), "rejected": draw.choice(BAD)} for a, b in sums]


def write_task(root: str) -> dict[str, str]:
    """Writes the task's JSON lines files into `root`: `sft`, `pairs`, `held_out_pairs`, `prompts` -> paths."""
    draw = random.Random(0)
    sft = [{"prompt": prompt(a, b), "completion": draw.choice(GOOD if draw.random() < 0.15 else BAD)}
           for a, b in TRAIN_SUMS * 2]
    return {"sft": _write(os.path.join(root, "sft.jsonl"), sft),
            "pairs": _write(os.path.join(root, "pairs.jsonl"), _pairs(TRAIN_SUMS, seed=1)),
            "held_out_pairs": _write(os.path.join(root, "held_out_pairs.jsonl"), _pairs(HELD_OUT_SUMS, seed=2)),
            "prompts": _write(os.path.join(root, "prompts.jsonl"), [{"prompt": prompt(a, b)} for a, b in TRAIN_SUMS])}


def config(tokenizer: str, **overrides):
    """The small model every run of the task uses (fp32; on all devices along fsdp), with dotted overrides."""
    from lm import config as lm_config

    c = lm_config.base_config()
    c.model.update(vocab_size=320, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                   max_seq_len=64, dtype="float32", remat_policy="none")
    c.data.update(source="files", seq_len=32, batch_size=16, tokenizer={"path": tokenizer})
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.loss.chunk_size = 128
    c.optim.update(warmup_steps=0, learning_rate=3e-3)
    c.update(log_every=1, eval_every=1000, eval_steps=1, checkpoint_every=1000)
    c.update_from_flattened_dict(overrides)
    return lm_config.validate(c)


def base_overrides(files) -> dict:
    return {"finetune.objective": "sft", "data.format": "prompt_completion", "data.files": files["sft"],
            "total_steps": 60, "log_every": 20}


def dpo_overrides(files, base: str) -> dict:
    # TRL's "sft" term (sft_weight): without it this tiny base drives the chosen and the rejected likelihoods down
    # together (logps/chosen about -20 after 80 steps at lr 1e-4) and decodes garbage.
    return {"init_from": base, "finetune.objective": "dpo", "finetune.dpo.sft_weight": 1.0,
            "data.format": "preference", "data.files": files["pairs"], "optim.learning_rate": 2e-4,
            "total_steps": 60, "log_every": 5}


def reward_model_overrides(files, base: str) -> dict:
    return {"init_from": base, "finetune.objective": "reward", "data.format": "preference",
            "data.files": files["pairs"], "optim.learning_rate": 1e-3, "total_steps": 30, "log_every": 5}


def ppo_overrides(files, base: str, **more) -> dict:
    return {"init_from": base, "finetune.objective": "ppo", "rl.prompts": files["prompts"], "rl.reward_fn": REWARD_FN,
            "rl.max_new_tokens": 8, "rl.kl_target": 6.0, "optim.learning_rate": 1e-3, "data.batch_size": 32,
            "total_steps": 16, **more}


def held_out_results(workdir: str, held_out_pairs: str, reference=None) -> dict:
    """A preference run's evaluation on the held-out pairs (a file it never trained on, read whole)."""
    from lm import checkpoint
    from lm import evaluate as evaluate_lib

    restored = checkpoint.restore(workdir)
    c = restored.config.copy_and_resolve_references()
    c.data.update(files=held_out_pairs, eval_split="train")
    c.eval_steps = -1
    return evaluate_lib.evaluate(c, restored.params, workdir=workdir, reference=reference)


def hello_rate(workdir: str, tokenizer_path: str) -> float:
    """The fraction of held-out prompts whose greedy completion says hello."""
    from lm import checkpoint
    from lm import generate as generate_lib
    from lm.data import tokenizer as tokenizer_lib

    restored = checkpoint.restore(workdir)
    completions = generate_lib.generate_text(restored.config, restored.params, tokenizer_lib.load(tokenizer_path),
                                             [prompt(a, b) for a, b in HELD_OUT_SUMS], max_new_tokens=6)
    return float(np.mean(says_hello([], completions)))


def train_tokenizer(path: str, text: str) -> str:
    """A 320-piece SentencePiece model trained as lm trains its own, on `text`."""
    import sentencepiece

    from lm import config as lm_config
    from lm.data import tokenizer_training

    settings = tokenizer_training.training_settings(lm_config.base_config())
    settings = {k: v for k, v in settings.items() if k not in ("max_chars", "sentencepiece")}
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines(keepends=True)),
                                            model_writer=writer, **{**settings, "vocab_size": 320})
    with open(path, "wb") as f:
        f.write(writer.getvalue())
    return path


def _curve(workdir: str, name: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(line["step"], line[name]) for line in lines if name in line]


def main(argv) -> None:
    del argv
    from lm import checkpoint
    from lm import rl
    from lm import train as train_lib

    root = flags.FLAGS.root
    os.makedirs(root, exist_ok=True)
    files = write_task(root)
    corpus = "".join(open(files[name]).read() for name in ("sft", "pairs"))
    tokenizer = train_tokenizer(os.path.join(root, "tokenizer.model"), corpus.replace('"', "\n"))
    path = lambda name: os.path.join(root, name)
    train_lib.train(config(tokenizer, **base_overrides(files)), path("base"))
    train_lib.train(config(tokenizer, **dpo_overrides(files, path("base"))), path("dpo"))
    train_lib.train(config(tokenizer, **reward_model_overrides(files, path("base"))), path("reward_model"))
    rl.train(config(tokenizer, **ppo_overrides(files, path("base"))), path("ppo"))
    rl.train(config(tokenizer, **ppo_overrides(files, path("base"), total_steps=8, **{
        "rl.reward_fn": "", "rl.reward_model": path("reward_model")})), path("ppo_reward_model"))

    dpo = held_out_results(path("dpo"), files["held_out_pairs"], reference=checkpoint.restore(path("base")).params)
    reward_model = held_out_results(path("reward_model"), files["held_out_pairs"])
    print(f"greedy hello rate on {len(HELD_OUT_SUMS)} held-out prompts: base {hello_rate(path('base'), tokenizer):.2f}, "
          f"DPO {hello_rate(path('dpo'), tokenizer):.2f}")
    print(f"held-out pairs: DPO reward accuracy {dpo['rewards/accuracies']:.3f} (margin {dpo['rewards/margins']:.3f}), "
          f"reward model pairwise accuracy {reward_model['accuracy']:.3f} (margin {reward_model['margin']:.3f}), "
          f"{reward_model['pairs']:.0f} pairs")
    for name, curve in curves(root).items():
        print(f"{name}: " + ", ".join(f"{step}: {value:.3f}" for step, value in curve))
    if flags.FLAGS.plot:
        plot(curves(root), flags.FLAGS.plot)
        print(f"wrote {flags.FLAGS.plot}")


def curves(root: str) -> dict[str, list[tuple[int, float]]]:
    """The logged curves of the runs in `root`: `{name: [(step, value), ...]}`."""
    path = lambda name: os.path.join(root, name)
    return {
        "DPO rewards/margins": _curve(path("dpo"), "rewards/margins"),
        "DPO logps/chosen": _curve(path("dpo"), "logps/chosen"),
        "DPO logps/rejected": _curve(path("dpo"), "logps/rejected"),
        "reward model loss": _curve(path("reward_model"), "loss"),
        "reward model accuracy": _curve(path("reward_model"), "accuracy"),
        "PPO reward (says_hello)": _curve(path("ppo"), "reward"),
        "PPO reward (reward model)": _curve(path("ppo_reward_model"), "reward"),
        "PPO KL (says_hello)": _curve(path("ppo"), "kl"),
        "PPO KL (reward model)": _curve(path("ppo_reward_model"), "kl"),
    }


def plot(curves_by_name: dict, output: str) -> None:
    """Four panels: DPO, the reward model, PPO's reward, PPO's KL against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("DPO (train batches)", ("DPO rewards/margins", "DPO logps/chosen", "DPO logps/rejected")),
              ("reward model (train batches)", ("reward model loss", "reward model accuracy")),
              ("PPO: mean reward of the rollouts", ("PPO reward (says_hello)", "PPO reward (reward model)")),
              ("PPO: KL to the reference per response", ("PPO KL (says_hello)", "PPO KL (reward model)")))
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for axis, (title, names) in zip(axes, panels):
        for name in names:
            axis.plot(*zip(*curves_by_name[name]), marker=".", label=name)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
    axes[3].axhline(6.0, color="gray", linestyle="--", label="rl.kl_target")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    from lm import cli

    flags.DEFINE_string("root", None, "Directory for the task's files and runs.", required=True)
    flags.DEFINE_string("plot", "", "Write the curves to this PNG.")
    cli.run(main)
