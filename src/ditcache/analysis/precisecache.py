"""PreciseCache's evidence (paper Fig. 3a / 4b) on a reference model.

For every step i >= 1: the *impact* of reusing the cached prediction at that single step (all other
steps computed) on the final output, as MSE against the uncached output; and three cheap predictors of
that impact, all measured on the uncached trajectory:
- LFD: PreciseCache's low-frequency difference of a downsampled trial forward (read from a PreciseCache
  run that never reuses, so the trajectory is the uncached one);
- rel-L1 of the guided prediction against the previous step's (what output-difference criteria use);
- rel-L1 of the first block's modulated input (what TeaCache uses; from a TeaCache run that never skips).
Pearson and Spearman correlations say how well each tracks the impact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from scipy import stats as scistats
from tqdm import tqdm

from .. import PreciseCacheConfig, ReuseScheduleConfig, TeaCacheConfig, apply
from ..numerics import rel_l1


@dataclasses.dataclass
class StepImpactStudy:
    model: str
    steps: int
    samples: int
    impact: list[float]  # index i-1 for step i
    lfd: list[float]
    output_rel_l1: list[float]
    input_rel_l1: list[float]
    correlations: dict[str, dict[str, float]]

    def markdown(self) -> str:
        lines = ["| predictor | Pearson r | Spearman ρ |", "|---|---|---|"]
        for name, corr in self.correlations.items():
            lines.append(f"| {name} | {corr['pearson']:.3f} | {corr['spearman']:.3f} |")
        return "\n".join(lines)


def _guided_outputs(pipe: Any, run: Any) -> list[torch.Tensor]:
    """Per-step guided prediction of an uncached run, captured from the transformer's outputs."""
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    cond, uncond = outputs[0::2], outputs[1::2]
    return [u + run.guidance * (c - u) for c, u in zip(cond, uncond)]


def step_impact_study(
    pipe: Any,
    model: str,
    steps: int = 50,
    samples: int = 8,
    seed: int = 0,
    guidance: float = 4.0,
    progress: bool = True,
) -> StepImpactStudy:
    labels = torch.arange(samples) % pipe.spec.num_classes

    def run() -> torch.Tensor:
        return pipe(labels, num_inference_steps=steps, guidance_scale=guidance, seed=seed)

    run.guidance = guidance  # type: ignore[attr-defined]
    reference = run()
    guided = _guided_outputs(pipe, run)
    output_rel_l1 = [rel_l1(guided[i], guided[i - 1]) for i in range(1, steps)]

    handle = apply(pipe, PreciseCacheConfig(alpha=1e-9))
    run()
    lfd_by_step = dict(handle.policy.lfd_trace)
    handle.remove()
    handle = apply(pipe, TeaCacheConfig(threshold=0.0))
    run()
    input_by_step: dict[int, list[float]] = {}
    for step, _, value in handle.policy.trace:
        input_by_step.setdefault(step, []).append(value)
    handle.remove()

    impact = []
    for i in tqdm(range(1, steps), desc="single-step reuse", disable=not progress):
        handle = apply(pipe, ReuseScheduleConfig(reuse_steps=(i,)))
        out = run()
        handle.remove()
        impact.append(float((out - reference).pow(2).mean()))
    lfd = [lfd_by_step[i] for i in range(1, steps)]
    input_rel_l1 = [sum(input_by_step[i]) / len(input_by_step[i]) for i in range(1, steps)]
    correlations = {}
    for name, values in (
        ("LFD (PreciseCache)", lfd),
        ("rel-L1 of output", output_rel_l1),
        ("rel-L1 of modulated input (TeaCache)", input_rel_l1),
    ):
        correlations[name] = {
            "pearson": float(scistats.pearsonr(values, impact).statistic),
            "spearman": float(scistats.spearmanr(values, impact).statistic),
        }
    return StepImpactStudy(model, steps, samples, impact, lfd, output_rel_l1, input_rel_l1, correlations)


def plot_study(study: StepImpactStudy, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    xs = list(range(1, study.steps))
    for name, values in (
        ("impact (MSE of final output)", study.impact),
        ("LFD", study.lfd),
        ("rel-L1 output", study.output_rel_l1),
        ("rel-L1 modulated input", study.input_rel_l1),
    ):
        top = max(values) or 1.0
        ax.plot(xs, [v / top for v in values], label=name)
    ax.set_xlabel("step reused (all others computed)")
    ax.set_ylabel("normalised to max")
    ax.set_title(f"{study.model}: impact of reusing one step vs cheap predictors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
