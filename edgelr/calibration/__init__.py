"""calibration/: what passes learn from sample inputs before they change anything: streaming input Grams
and the model's own outputs (grams), whitened spectra (spectra), measured layer sensitivity (sensitivity),
all cached per model and samples (analysis); a diffusion denoiser's inputs captured along its pipeline's
sampling runs, spread over the noise levels (trajectories). May import core, graph and io."""
