"""`RefPipeline`: sampling for the reference models with diffusers' schedulers: FlowMatchEulerDiscreteScheduler
for the flow models, DDIMScheduler (linear betas, DiT's training schedule) for `ref-dit`.

It has `.transformer` and `.scheduler` like a diffusers pipeline, so `ditcache.apply(pipe, config)` and
diffusers' own cache hooks attach to it the same way. CFG runs either as two forwards per step wrapped in
`transformer.cache_context("cond"/"uncond")` (what Flux and Wan pipelines do) or batched (uncond and cond
concatenated into one forward, as SD3's pipeline does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from ..api import cache_context
from .models import RefModel, RefModelSpec, get_spec

WEIGHTS_DIR = Path(__file__).parent / "weights"
CFG_MODES = ("separate", "batched")


if TYPE_CHECKING:
    from ..calibration.record import CalibrationRun


class RefPipeline:
    def __init__(self, model: RefModel) -> None:
        self.model = model.eval().requires_grad_(False)
        self.spec: RefModelSpec = model.spec
        self.transformer = model.transformer
        self.scheduler = make_scheduler(self.spec)
        self.current_timestep: float | None = None  # for hooks that ask for it (diffusers' PAB)
        self.separate_cfg = True  # how the last/next call runs CFG (cache-dit needs to know)

    @classmethod
    def from_pretrained(
        cls, name: str, weights_dir: Path | None = None, spec: RefModelSpec | None = None
    ) -> RefPipeline:
        """Load a shipped reference model (safetensors, never pickle); `spec` overrides the named one."""
        spec = spec or get_spec(name)
        path = Path(weights_dir or WEIGHTS_DIR) / f"{spec.name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no weights for {name} at {path}; train them with `ditcache train-ref {name}`")
        model = RefModel(spec)
        model.load_state_dict(load_file(str(path)))
        return cls(model)

    @staticmethod
    def metadata(name: str, weights_dir: Path | None = None) -> dict:
        path = Path(weights_dir or WEIGHTS_DIR) / f"{get_spec(name).name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def initial_noise(self, batch: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.spec.sample_shape), generator=generator)

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor | list[int],
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        cfg_mode: str = "separate",
        latents: torch.Tensor | None = None,
        return_trajectory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Samples in [-1, 1]: (B, 3, H, W) for images, (B, 3, F, H, W) for videos."""
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        x = latents.clone() if latents is not None else self.initial_noise(len(labels), seed)
        guidance_scale = self.spec.guidance if guidance_scale is None else guidance_scale
        use_cfg = guidance_scale != 1.0
        null = torch.full_like(labels, self.spec.null_class)
        self.scheduler.set_timesteps(num_inference_steps)
        self.separate_cfg = cfg_mode == "separate"
        trajectory = [x.clone()]
        for i, t in enumerate(self.scheduler.timesteps):
            self.current_timestep = float(t)
            timestep = t.expand(len(labels))
            hints = {"step_index": i, "num_inference_steps": num_inference_steps}
            if use_cfg and cfg_mode == "batched":
                both = self._predict(
                    torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([null, labels]), None
                )
                uncond, cond = both.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            else:
                prediction = self._predict(x, timestep, labels, ("cond", hints))
                if use_cfg:
                    uncond = self._predict(x, timestep, null, ("uncond", hints))
                    prediction = uncond + guidance_scale * (prediction - uncond)
            x = self.scheduler.step(prediction.to(x.dtype), t, x, return_dict=False)[0]
            if return_trajectory:
                trajectory.append(x.clone())
        return (x, trajectory) if return_trajectory else x

    def calibration_run(
        self, num_steps: int, samples: int, seed: int = 1, guidance: float | None = None
    ) -> CalibrationRun:
        """One calibration generation for `ditcache.calibrate`: `samples` labels cycling through the classes,
        CFG as separate cond / uncond forwards; returns the final sample in the transformer's input layout."""
        from ..calibration.record import CalibrationRun

        labels = torch.arange(samples) % self.spec.num_classes
        guidance = self.spec.guidance if guidance is None else guidance

        def run() -> torch.Tensor:
            x = self(labels, num_inference_steps=num_steps, guidance_scale=guidance, seed=seed)
            return self.model.model_inputs(x, labels)["hidden_states"]

        return CalibrationRun(run, num_steps, guidance, {"samples": samples, "seed": seed, "guidance": guidance})

    def dataset_calibration_run(
        self, num_steps: int, samples: int, seed: int = 1, guidance: float | None = None
    ) -> CalibrationRun:
        """Like `calibration_run`, from the training data instead of the model's own samples (TokenCache's
        Algorithm 1): `samples` data samples (classes cycled), one noise draw each, noised to every timestep
        of the sampler (`ditcache.calibration.dataset.noised_data_run`)."""
        from ..calibration.dataset import ddpm_noise, flow_noise, noised_data_run
        from .train import data_for

        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(samples) % self.spec.num_classes
        inputs = self.model.model_inputs(data_for(self.spec, labels, generator), labels)
        latents = inputs.pop("hidden_states")
        guidance = self.spec.guidance if guidance is None else guidance
        branches = {"cond": inputs}
        if guidance != 1.0:
            null = torch.full_like(labels, self.spec.null_class)
            uncond = self.model.model_inputs(torch.zeros(samples, *self.spec.sample_shape), null)
            uncond.pop("hidden_states")
            branches["uncond"] = uncond
        self.scheduler.set_timesteps(num_steps)
        epsilon = self.spec.prediction == "epsilon"
        generation = noised_data_run(
            self.transformer,
            latents,
            self.scheduler.timesteps.clone(),
            ddpm_noise(self.scheduler) if epsilon else flow_noise,
            branches,
            timestep_scale=1 / 1000 if self.spec.family == "flux" else 1.0,
            guidance=guidance,
            seed=seed,
        )
        generation.meta.update({"guidance": guidance})
        return generation

    def _predict(
        self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor, branch: tuple | None
    ) -> torch.Tensor:
        if branch is None:
            return self.model.predict(x, timestep, labels)
        name, hints = branch
        with cache_context(self.transformer, name, **hints):
            return self.model.predict(x, timestep, labels)


def make_scheduler(spec: RefModelSpec) -> FlowMatchEulerDiscreteScheduler | DDIMScheduler:
    if spec.prediction == "epsilon":
        # DDPM's linear betas as in training; "trailing" spacing starts at t = 999 (pure noise) and the last
        # step lands on x0 (set_alpha_to_one); pixels are clipped to [-1, 1] like the training data.
        return DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            clip_sample=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
