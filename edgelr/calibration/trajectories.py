"""Calibration along real sampling trajectories: the denoiser's inputs, captured while its pipeline generates.

A diffusion model's denoiser sees a different input at every noise level: pure noise at the first step, an
almost clean image at the last. Calibration samples drawn from one noise level (or made up) whiten and
quantize for that level alone; these are captured from actual sampling runs, so every level is seen:

    traj = capture_trajectories(pipe, seeds=range(4), steps=20, prompts=["a red cat"], guidance=7.5)
    traj.save("unet-calib.npz")          # what edgelr.api.compress(..., calib=) reads (edgelr.io.samples)
    traj.timesteps                       # the timestep of each sample, in the order they were kept

`pipe` is an exported pipeline's runner (edgelr.deploy.pipeline_run.OnnxDiffusionPipeline, or anything that
has its `unet` session, `unet_inputs`, `conditional` and call signature); it is run once per seed (all
prompts in one batch), and while it runs its denoiser session is wrapped so that every call's inputs are
recorded. With classifier-free guidance the denoiser runs at twice the batch (the negative prompt's
embedding for every prompt, then the prompts'): both halves are kept, as separate samples, each with its own
encoder_hidden_states row.

The .npz holds one array per denoiser input, named after it, one sample per row at batch 1:
`sample` (S, C, H, W), `timestep` (S,) whether the model takes it per batch row (batch,) or as a scalar
(edgelr.io.samples reads (S,) for both: samples on the batch axis, or one scalar per sample), and
`encoder_hidden_states` (S, tokens, width) for a text-conditioned denoiser.

Subsampling (`samples`, default 64): each step of the schedule gives rows = seeds x prompts x (2 with
guidance) denoiser rows over all runs. When steps x rows is at most `samples`, all are kept. Otherwise each
step keeps samples // steps of its rows (samples % steps of the steps, spread evenly over the schedule, keep
one more), picked evenly over its rows and rotated from step to step so every seed, prompt and guidance half
appears: every timestep, i.e. every noise level of the schedule, has the same number of samples, give or
take one (64 samples over 20 steps: 3 or 4 per step). When `samples` < steps, the schedule is cut into
`samples` equal ranges of consecutive steps and the middle step of each keeps one row: one sample per
steps / samples noise levels. Rows not kept are never copied, so memory holds only what is kept.

Order: round after round, one sample per step, the steps farthest-first (first, last, middle, ...), so any
prefix of the samples (a pass that probes on the first few) still spans the noise levels.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelr.errors import EdgelrError

DEFAULT_SAMPLES = 64
DEFAULT_PROMPTS = ("a photo of a cat", "a red car on a street", "a mountain landscape at sunset", "a portrait of a person")


@dataclass
class Trajectories:
    """The denoiser inputs kept from sampling runs (one array per input, samples on axis 0) and where they
    came from."""

    arrays: dict[str, np.ndarray]
    timesteps: np.ndarray  # the timestep of each sample (int)
    schedule: np.ndarray  # the run's timesteps, first to last
    seeds: tuple[int, ...]
    prompts: tuple[str, ...] | None
    guidance: float | None  # None: no classifier-free guidance ran
    rows_per_step: int  # denoiser batch rows per step, over all runs
    per_step: dict[int, int] = field(default_factory=dict)  # timestep -> samples kept there

    def __len__(self) -> int:
        return len(self.timesteps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the arrays as an .npz (whole or not at all) that edgelr.api.compress reads as `calib`."""
        path = Path(path)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".npz", delete=False) as f:
            staged = Path(f.name)
        try:
            np.savez(staged, **self.arrays)
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)
        return path

    def summary(self) -> dict:
        """What a manifest records: how many samples, from what runs, and how they spread over the schedule
        (per tenth of the schedule, first to last step)."""
        order = {int(t): i for i, t in enumerate(self.schedule)}
        tenths = np.zeros(min(10, len(self.schedule)), int)
        for t in self.timesteps:
            tenths[order[int(t)] * len(tenths) // len(self.schedule)] += 1
        return {"samples": len(self), "steps": len(self.schedule), "seeds": list(self.seeds),
                "prompts": list(self.prompts) if self.prompts is not None else None, "guidance": self.guidance,
                "rows_per_step": self.rows_per_step, "timesteps_covered": len(self.per_step),
                "samples_per_tenth_of_schedule": tenths.tolist(),
                "inputs": {k: list(v.shape) for k, v in self.arrays.items()}}


def capture_trajectories(pipe, *, seeds: Sequence[int] | int = 4, steps: int = 20,
                         prompts: Sequence[str] | None = None, guidance: float = 7.5, negative_prompt: str = "",
                         samples: int = DEFAULT_SAMPLES) -> Trajectories:
    """Run PIPE once per seed for STEPS steps (a text-conditioned pipeline on PROMPTS, default DEFAULT_PROMPTS,
    with GUIDANCE; an unconditional one at batch 1) and keep at most SAMPLES of its denoiser's inputs,
    spread evenly over the timesteps (the module's docstring says how)."""
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seeds:
        raise EdgelrError("seeds: give at least one seed to sample trajectories from")
    if steps < 1:
        raise EdgelrError(f"steps {steps}: need 1 or more sampling steps")
    if samples < 1:
        raise EdgelrError(f"samples {samples}: keep at least one calibration sample")
    conditional = bool(pipe.conditional)
    if conditional:
        prompts = tuple(prompts) if prompts else DEFAULT_PROMPTS
    elif prompts:
        raise EdgelrError("prompts: this pipeline is unconditional (no text encoder); leave them out")
    else:
        prompts = None
    cfg = conditional and guidance > 1
    per_call = (len(prompts) * (2 if cfg else 1)) if conditional else 1
    rows = per_call * len(seeds)
    keep = _plan(steps, rows, samples)  # step index -> the global rows kept there
    recorder = _Recorder(pipe.unet, pipe.unet_inputs, keep, per_call)
    original = pipe.unet
    pipe.unet = recorder
    try:
        for run, seed in enumerate(seeds):
            recorder.start(run)
            if conditional:
                pipe(list(prompts), steps=steps, guidance=guidance, negative_prompt=negative_prompt, seed=seed)
            else:
                pipe(None, steps=steps, batch=1, seed=seed)
    finally:
        pipe.unet = original
    schedule = np.asarray(pipe.scheduler.timesteps).astype(np.int64)
    if recorder.step != len(schedule) or len(schedule) != steps:
        raise EdgelrError(f"the pipeline ran its denoiser {recorder.step} times for {steps} steps; "
                          "trajectories need one denoiser call per step")
    arrays, timesteps = recorder.arrays()
    per_step: dict[int, int] = {}
    for t in timesteps:
        per_step[int(t)] = per_step.get(int(t), 0) + 1
    return Trajectories(arrays, timesteps, schedule, seeds, prompts, guidance if cfg else None, rows, per_step)


def _plan(steps: int, rows: int, samples: int) -> dict[int, list[int]]:
    """Which rows (0..rows-1, over all runs) each step keeps (see the module's docstring)."""
    if steps * rows <= samples:
        return {s: list(range(rows)) for s in range(steps)}
    if samples < steps:
        edges = np.linspace(0, steps, samples + 1)
        chosen = [int((edges[i] + edges[i + 1]) // 2) for i in range(samples)]  # the middle of each range
        return {s: [int(i * rows * 0.6180339887) % rows] for i, s in enumerate(chosen)}  # rows rotate (golden ratio)
    base, extra = divmod(samples, steps)
    more = set(np.linspace(0, steps - 1, extra).round().astype(int).tolist()) if extra else set()
    plan = {}
    for s in range(steps):
        k = base + (s in more)
        plan[s] = sorted({(j * rows // k + s) % rows for j in range(k)})
    return plan


class _Recorder:
    """Stands in for the pipeline's denoiser session: runs it and keeps the planned rows of each call's inputs."""

    def __init__(self, session, specs: dict, keep: dict[int, list[int]], per_call: int):
        self.session, self.specs, self.keep, self.per_call = session, specs, keep, per_call
        self.kept: list[tuple[int, int, dict[str, np.ndarray]]] = []  # (step, timestep, one sample's inputs)
        self.run_index, self.step = 0, 0

    def start(self, run: int) -> None:
        self.run_index, self.step = run, 0

    def __getattr__(self, name):  # get_inputs, get_outputs, ...: the session's
        return getattr(self.session, name)

    def run_inputs(self, feed: dict) -> None:
        sample = feed["sample"]
        batch = len(sample)
        if batch != self.per_call:
            raise EdgelrError(f"the denoiser ran at batch {batch}, {self.per_call} expected")
        t = np.asarray(feed["timestep"])
        for row in self.keep.get(self.step, ()):
            local = row - self.run_index * batch
            if not 0 <= local < batch:
                continue
            one = {}
            for name, value in feed.items():
                value = np.asarray(value)
                if name == "timestep":
                    one[name] = value.reshape(-1)[local if value.ndim else 0].copy()
                else:
                    one[name] = value[local].copy()
            self.kept.append((self.step, int(t.reshape(-1)[local if t.ndim else 0]), one))

    def run(self, names, feed: dict):  # the session's run, recording first
        self.run_inputs(feed)
        self.step += 1
        return self.session.run(names, feed)

    def arrays(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The kept inputs stacked, ordered so that every prefix spreads over the schedule: round after round,
        one sample of each step, the steps in farthest-first order (a pass that reads the first few samples,
        e.g. a sensitivity probe, still sees every noise level)."""
        if not self.kept:
            raise EdgelrError("no denoiser inputs were captured")
        by_step: dict[int, list] = {}
        for step, t, one in self.kept:
            by_step.setdefault(step, []).append((t, one))
        order = spread_order(sorted(by_step))
        ordered = [by_step[s][r] for r in range(max(map(len, by_step.values())))
                   for s in order if r < len(by_step[s])]
        names = list(ordered[0][1])
        arrays = {name: np.stack([one[name] for _, one in ordered]) for name in names}
        return arrays, np.array([t for t, _ in ordered], np.int64)


def spread_order(values: Sequence[int]) -> list[int]:
    """VALUES reordered farthest-first: each next one the farthest from those before it (ties: the earlier),
    so any prefix covers their range about evenly."""
    left = list(values)
    if not left:
        return []
    out = [left.pop(0)]
    while left:
        best = max(range(len(left)), key=lambda i: (min(abs(left[i] - o) for o in out), -i))
        out.append(left.pop(best))
    return out
