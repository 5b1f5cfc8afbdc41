"""
Training Refiner-ViT with accelerate. `trainer.train(args)` runs a training run and returns its results;
`examples/run_imagenet.py` is its command line:

    from refiner_hf.training.arguments import parse_args
    from refiner_hf.training.trainer import train

    results = train(parse_args(["--recipe", "refiner_vit_s.yaml", "--dataset_name", "ILSVRC/imagenet-1k"],
                               recipe_dirs=["examples/recipes"]))

- `trainer`: the training loop (setup, epochs, evaluation, checkpoints, the model directory, the results).
- `arguments`: the trainer's arguments in model / data / training groups, and YAML recipes (unknown keys and wrong
  types are errors).
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
- `distributed`, `model_setup`, `tracking`, `card`, `run_lock`, `errors`: launching details, building the model,
  logging, the model card, one writer per output directory, one-line usage errors.

Requires the `train` extra: `pip install "refiner-hf[train]"`.
"""
