"""The language-modelling objective on one batch, shared by the train step and the eval step.

    batch ─▶ model.apply ─▶ hidden_btd ─▶ lm.loss.cross_entropy(hidden_btd, LM head [d, v], targets, weights)

A batch is a dict of `[batch, length]` arrays: `inputs`, `targets` (int32), and optionally `weights` (float32, 0 on
padding), `segment_ids` and `positions` (int32) for packed rows (`lm.data.packing`).
"""

from __future__ import annotations

import jax
import ml_collections

from lm import loss as loss_lib
from lm import model as model_lib


def lm_loss(params, batch: dict[str, jax.Array], model: model_lib.Transformer, config: ml_collections.ConfigDict
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Chunked cross-entropy of `model` on `batch`: `(loss, aux)` as `lm.loss.cross_entropy` returns them.

    The logits are never formed whole: the LM head is applied block by block over the vocabulary inside the loss,
    soft-capped by `config.model.logit_softcap` as `Transformer.logits` is.
    """

    def hidden_and_head(module: model_lib.Transformer):
        hidden_btd = module(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        return hidden_btd, module.output_kernel()

    hidden_btd, kernel_dv = model.apply({"params": params}, method=hidden_and_head)
    return loss_lib.cross_entropy(
        hidden_btd, kernel_dv, batch["targets"], batch.get("weights"), chunk_size=config.loss.chunk_size,
        z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing,
        logit_softcap=config.model.logit_softcap)
