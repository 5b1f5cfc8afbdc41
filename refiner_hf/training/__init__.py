"""
Training Refiner-ViT: the reusable pieces of `examples/run_imagenet.py`.

- `arguments`: the trainer's arguments and YAML recipes (unknown keys and wrong types are errors).
- `data`: data sets (Hub, local `imagefolder`, streaming, the embedded Fashion-MNIST subset), checks before training,
  decoding that names bad images.
- `loaders`: the seeded sampler, the training and evaluation datasets (with per-sample crop records and optional
  dense targets), collators and DataLoaders.
- `augmentation`: timm's training augmentation recording each crop, flip and geometric operation; per-sample
  seeding.
- `mixing`: mixup / CutMix of the images and class targets, and of the teacher's labels alike.
- `relabel_targets`: relabel keys of training images, the checks before training, the teacher's labels of each sample
  following its augmentation.
- `optim`: AdamW with the recipe's weight-decay groups and timm's cosine schedule.
- `ema`: the model EMA.
- `checkpointing`: atomic, pruned, resumable accelerate checkpoints and the run's position.
- `evaluation`: top-1 / top-5, every sample counted once across processes.
- `distributed`, `model_setup`, `tracking`, `card`: launching details, building the model, logging, the model card.

Requires the `train` extra: `pip install "refiner-hf[train]"`.
"""
