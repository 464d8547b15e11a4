"""Fine-tuning from clickstream: click log -> debiased examples, the trainer, Ray Tune over Ray Train
trials, the quality gate and ranking metrics. `python -m es_ray.train` is the fine-tune job."""
