"""`moee verify`: run a checkpoint through moee-ref and through transformers and compare.

transformers is an optional dependency (the `test` extra). A family that
transformers loads with its own classes is compared with AutoModelForCausalLM;
a family it has no class for (DeepSeekMoE) brings its own
`transformers_reference`, an exactly equivalent transformers model (see its
family file).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..decoder.moe import expert_candidates
from ..errors import MoEERefError
from ..families import family_of
from ..loading.checkpoint import ShardReader, shard_files

VERIFY_SENTENCES = [
    "The cat sat on the mat.",
    "Mixture-of-experts models route every token to a few experts.",
    "A short one.",
    'This sentence : "Routers are embeddings too." means in one word:"',
]
# float32 rounding differs between any two implementations (kernel choice, summation order) and
# grows with depth; these bounds leave room for a 28-layer model. The test suite holds small
# models to 1e-5 / 1e-6; a real divergence (a wrong norm, bias or routing rule) is orders larger.
TOLERANCES = {"logits_rel": 1e-4, "hidden_rel": 1e-4, "router_probs_abs": 1e-5}


class VerifyUnavailable(MoEERefError):
    """transformers is not installed, so there is nothing to verify against."""


@dataclass
class VerifyReport:
    family: str
    tokens: int
    logits_rel: float
    hidden_rel: float
    router_probs_abs: float
    topk_agreement: float  # share of (token, layer) whose top-k expert set is identical
    topk_real_mismatches: int  # differing top-k sets not explained by a near-tie within the probability tolerance
    passed: bool

    def rows(self) -> list[tuple[str, str, str, str]]:
        def verdict(ok):
            return "ok" if ok else "MISMATCH"

        t = TOLERANCES
        return [
            ("logits, max rel. error", f"{self.logits_rel:.2e}", f"<= {t['logits_rel']:.0e}", verdict(self.logits_rel <= t["logits_rel"])),
            ("hidden states, max rel. error", f"{self.hidden_rel:.2e}", f"<= {t['hidden_rel']:.0e}", verdict(self.hidden_rel <= t["hidden_rel"])),
            ("router probs, max abs. error", f"{self.router_probs_abs:.2e}", f"<= {t['router_probs_abs']:.0e}", verdict(self.router_probs_abs <= t["router_probs_abs"])),
            ("top-k experts identical", f"{100 * self.topk_agreement:.2f}%", "100% (near-ties aside)", verdict(self.topk_real_mismatches == 0)),
        ]

    def to_dict(self) -> dict:
        return {**asdict(self), "tolerances": TOLERANCES}


def format_report(report: VerifyReport) -> str:
    lines = [f"{report.family}: {report.tokens} real tokens compared, float32", f"{'check':<32} {'measured':>10}  {'tolerance':<24} result"]
    lines += [f"{name:<32} {value:>10}  {tol:<24} {verdict}" for name, value, tol, verdict in report.rows()]
    lines.append("PASS" if report.passed else "FAIL: moee-ref and transformers disagree beyond tolerance")
    return "\n".join(lines)


def load_reference(directory: Path, args):
    """transformers' model of the checkpoint, float32, eval mode."""
    try:
        import transformers
    except ImportError:
        raise VerifyUnavailable("moee verify needs transformers: pip install transformers (in a clone of moee-ref: pip install -e '.[test]')") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    build = getattr(family_of(args), "transformers_reference", None)
    if build is None:
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    # A family transformers cannot load as it is: its reference is filled straight from the checkpoint's
    # tensors (not through moee-ref's loader, so a mistake there cannot hide on both sides).
    with ShardReader(shard_files(directory)).reading() as shards:
        return build(transformers, args, lambda name: shards.read(name).float())


def verify(model, tokenizer, reference) -> VerifyReport:
    batch = tokenizer.encode_batch(VERIFY_SENTENCES)
    ids, mask = batch.input_ids, batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ours = model(ids, mask, return_logits=True)
        ref = reference.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_router_logits=True, use_cache=False)
        ref_logits = reference.lm_head(ref.last_hidden_state)
    real = mask.bool()
    batch_size, length = ids.shape
    ref_probs = torch.stack([r.reshape(batch_size, length, -1) for r in ref.router_logits], dim=1).float().softmax(-1)
    real_routing = real[:, None, :].expand(-1, ref_probs.shape[1], -1)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    k = model.args.top_k
    ours_sets = ours.topk_ids.sort(-1).values[real_routing]
    # The experts the router may pick from (DeepSeek-V2's group-limited router: the best groups' only).
    ref_candidates = expert_candidates(ref_probs, model.args.num_groups, model.args.topk_group)
    ref_top = ref_candidates.topk(k + 1 if k < ref_probs.shape[-1] else k, dim=-1)
    ref_sets = ref_top.indices[..., :k].sort(-1).values[real_routing]
    same = (ours_sets == ref_sets).all(-1)
    if k < ref_probs.shape[-1]:
        # A swap between the k-th and (k+1)-th expert is a near-tie when their probabilities are within tolerance.
        gap = (ref_top.values[..., k - 1] - ref_top.values[..., k])[real_routing]
        real_mismatches = int((~same & (gap > TOLERANCES["router_probs_abs"])).sum())
    else:
        real_mismatches = int((~same).sum())
    report = VerifyReport(
        family=model.args.family,
        tokens=int(real.sum()),
        logits_rel=rel(ours.logits[real], ref_logits[real]),
        hidden_rel=rel(ours.hidden_states[real], ref.last_hidden_state[real]),
        router_probs_abs=float((ours.router_probs - ref_probs)[real_routing].abs().max()),
        topk_agreement=float(same.float().mean()),
        topk_real_mismatches=real_mismatches,
        passed=False,
    )
    report.passed = (
        report.logits_rel <= TOLERANCES["logits_rel"]
        and report.hidden_rel <= TOLERANCES["hidden_rel"]
        and report.router_probs_abs <= TOLERANCES["router_probs_abs"]
        and real_mismatches == 0
    )
    return report
