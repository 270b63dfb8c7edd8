"""Per-layer routing of texts: which experts each MoE layer picks at a token, with their weights.

What `moee route --json` prints and what `moee serve` answers on /v1/route: one computation for both.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..decoder.model import DecoderOutput
from .embedder import last_real_position
from .spec import FeatureOptions


def routing_table(out: DecoderOutput, row: int, position: int, top: int | None = None,
                  all_probs: bool = False) -> list[dict[str, Any]]:
    """Per MoE layer: the experts chosen at one token, with their router probabilities and mixing weights.
    all_probs: also the router's whole probability vector over the experts ("router_probs")."""
    table = []
    for i, layer in enumerate(out.moe_layers):
        ids = out.topk_ids[row, i, position]
        weights = out.topk_weights[row, i, position]
        probs = out.router_probs[row, i, position]
        order = torch.argsort(weights, descending=True)
        if top is not None:
            order = order[:top]
        entry = {
            "layer": layer,
            "experts": [int(ids[j]) for j in order],
            "weights": [round(float(weights[j]), 6) for j in order],
            "probs": [round(float(probs[ids[j]]), 6) for j in order],
            "entropy": round(float(-(probs * probs.clamp_min(1e-30).log()).sum()), 6),
        }
        if all_probs:
            entry["router_probs"] = [round(float(p), 6) for p in probs]
        table.append(entry)
    return table


def route_texts(embedder, texts: Sequence[str], options: FeatureOptions | None = None, *, all_tokens: bool = False,
                top: int | None = None, all_probs: bool = False):
    """(decoder output, per text {"text", "tokens": [{"position", "token_id", "token", "layers"}]}, each row's last
    position in the decoder output): the routing at each text's last token (every token with all_tokens), of the
    token ids the text runs as when it is embedded with these options (prompt applied, cut as `moee embed` cuts)."""
    model, tokenizer = embedder.model, embedder.tokenizer
    sequences, _ = embedder.token_ids(texts, options)
    batch = tokenizer.pad(sequences, padding_side="left")
    with torch.inference_mode():
        out = model(batch.input_ids, batch.attention_mask)
    last = last_real_position(batch.attention_mask)
    results = []
    for row, text in enumerate(texts):
        first = int(last[row]) - batch.lengths[row] + 1
        positions = range(first, int(last[row]) + 1) if all_tokens else [int(last[row])]
        tokens = []
        for pos in positions:
            token_id = int(batch.input_ids[row, pos])
            tokens.append({"position": pos - first, "token_id": token_id, "token": tokenizer.decode([token_id]),
                           "layers": routing_table(out, row, pos, top=top, all_probs=all_probs)})
        results.append({"text": text, "tokens": tokens})
    return out, results, last
