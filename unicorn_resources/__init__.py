"""Resources: models (LLM, CLIP, diffusion) and storage."""
