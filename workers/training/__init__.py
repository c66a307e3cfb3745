"""Fine-tuning the pairwise judge: examples from stored labels, the LoRA loop, atomic checkpoints,
and the queued job (``cvgl.train``) that ties them to the database."""
