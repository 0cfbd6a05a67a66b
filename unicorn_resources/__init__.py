"""Resources, the bottom layer: models (LLM, CLIP, diffusion), storage, the seed source, quality
gates and the trainer-side export reader. Imports neither unicorn_assets nor dagster_project."""
