"""
Training Refiner-ViT: the reusable pieces of `examples/run_imagenet.py`.

- `arguments`: the trainer's arguments and YAML recipes (unknown keys and wrong types are errors).
- `data`: data sets (Hub, local `imagefolder`, streaming, the embedded Fashion-MNIST subset), checks before training,
  decoding that names bad images.
- `loaders`: the seeded sampler, the training and evaluation datasets (with per-sample crop records and optional
  dense targets), collators and DataLoaders.
- `transforms`: timm's training augmentation recording each crop and flip, per-sample seeding, mixup / CutMix.
- `token_labeling`: relabel keys of training images, the checks before training, dense labels following each crop
  and flip, and their mixing with the batch.
- `optim`: AdamW with the recipe's weight-decay groups and timm's cosine schedule.
- `ema`: the model EMA.
- `checkpointing`: atomic, pruned, resumable accelerate checkpoints and the run's position.
- `evaluation`: top-1 / top-5 through a local `evaluate` metric, every sample counted once across processes.
- `distributed`, `modeling`, `tracking`, `card`: launching details, building the model, logging, the model card.

Requires the `train` extra: `pip install "refiner-hf[train]"`.
"""
