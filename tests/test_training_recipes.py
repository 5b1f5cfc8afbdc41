"""Recipes and arguments of the trainer: every recipe loads, every key is an argument, the paper's values, errors."""

import json
import math
import re

import pytest
import yaml
from training_utils import RECIPES

from refiner_hf.training import arguments
from refiner_hf.training.arguments import RecipeError, UsageError, load_recipe, parse_args, recipe_keys


RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_the_shipped_recipes_are_there():
    names = {path.name for path in RECIPE_FILES}
    assert {
        "embedded_fashion_mnist.yaml",
        "refiner_vit_s.yaml",
        "refiner_vit_m.yaml",
        "refiner_vit_l.yaml",
        "refiner_vit_s_384_finetune.yaml",
        "refiner_vit_m_384_finetune.yaml",
        "refiner_vit_l_384_finetune.yaml",
        "refiner_vit_l_448_finetune.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_recipe_key_maps_to_an_argument_and_the_recipe_parses(path, monkeypatch):
    monkeypatch.setattr(arguments, "available_cpus", lambda: 64)  # the recipes' loader workers, not this machine's
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(recipe_keys())
    values = load_recipe(path)
    args = parse_args(["--recipe", path.name, "--dataset_name", "some/dataset"], recipe_dirs=[RECIPES])
    flat = args.flat()
    for key, value in values.items():
        assert flat[key] == value, key
    assert args.training.recipe == str(path)


# The original repository's training scripts (scripts/refiner_*.yaml, arguments of timm's train.py), in this
# trainer's names: what each pretraining recipe must train. `aux_head` is the scripts' return_dense;
# `attention_similarity_pairs` the n_comn their loss is built with (cos_reg_component for the relabel loss, the
# constructor's default 2 for the plain loss, which ignores cos_reg_component).
ORIGINAL_COMMON = {
    "lr": 5e-4, "weight_decay": 0.05, "epochs": 300, "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-5,
    "cooldown_epochs": 10, "lr_schedule_unit": "epoch", "per_device_train_batch_size": 32, "image_size": 224,
    "scale": [0.08, 1.0], "train_interpolation": "random", "hflip": 0.5, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
    "remode": "pixel", "recount": 1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
    "mixup_mode": "batch", "smoothing": 0.1, "model_ema": True, "model_ema_decay": 0.99996, "seed": 42,
    "opt_betas": [0.9, 0.999], "opt_eps": 1e-8, "clip_grad": None, "attention_similarity_weight": 0.1,
}  # fmt: skip
ORIGINAL_SCRIPTS = {
    "refiner_vit_s.yaml": {"drop_path": 0.1, "aux_head": False, "mix_token": False, "attention_similarity_pairs": 2},
    "refiner_vit_m.yaml": {"drop_path": 0.2, "aux_head": False, "mix_token": False, "attention_similarity_pairs": 2},
    "refiner_vit_s_relabel.yaml": {"drop_path": 0.2, "aux_head": None, "mix_token": True, "dense_weight": 0.5,
                                   "relabel_size": 14, "attention_similarity_pairs": 12},
    "refiner_vit_m_relabel.yaml": {"drop_path": 0.25, "aux_head": None, "mix_token": True, "dense_weight": 0.5,
                                   "relabel_size": 14, "attention_similarity_pairs": 12},
    "refiner_vit_l_relabel.yaml": {"drop_path": 0.25, "aux_head": None, "mix_token": True, "dense_weight": 0.5,
                                   "relabel_size": 14, "attention_similarity_pairs": 12},
}  # fmt: skip


@pytest.mark.parametrize("recipe", list(ORIGINAL_SCRIPTS))
def test_pretraining_recipes_train_what_the_original_scripts_train(recipe):
    args = parse_args(["--recipe", recipe, "--dataset_name", "x"], recipe_dirs=[RECIPES])
    expected = {**ORIGINAL_COMMON, **ORIGINAL_SCRIPTS[recipe]}
    flat = args.flat()
    assert {key: flat[key] for key in expected} == expected
    assert args.training.ratio == pytest.approx([3 / 4, 4 / 3])
    assert args.training.total_epochs == 310
    if "relabel" in recipe:  # the original's teacher class target and its CutMix of the dense labels
        assert (flat["relabel_class_target"], flat["dense_label_cutmix"], flat["relabel_normalization"]) == (
            "teacher",
            "blend",
            "softmax",
        )


def test_the_plain_recipes_build_a_model_without_the_aux_head(tmp_path):
    from refiner_hf.training.model_setup import build_model

    args = parse_args(["--recipe", "refiner_vit_s.yaml", "--dataset_name", "x"], recipe_dirs=[RECIPES])
    config = build_model(args.model, 10, None).model.config
    assert not config.use_aux_head and config.attention_similarity_pairs == 2 and config.drop_path_rate == 0.1


def test_finetune_recipes_set_the_resolution():
    for name, size in (("refiner_vit_s_384_finetune.yaml", 384), ("refiner_vit_l_448_finetune.yaml", 448)):
        args = parse_args(["--recipe", name, "--dataset_name", "x", "--model_name_or_path", "m"], recipe_dirs=[RECIPES])
        training = args.training
        assert args.model.image_size == size and training.lr == 5e-6 and training.min_lr == 5e-6
        assert training.weight_decay == 1e-8


def test_command_line_overrides_the_recipe():
    args = parse_args(
        [
            "--recipe",
            "refiner_vit_s.yaml",
            "--lr",
            "1e-3",
            "--no_model_ema",
            "--scale",
            "0.2",
            "1",
            "--dataset_name",
            "x",
        ],
        recipe_dirs=[RECIPES],
    )
    assert args.training.lr == 1e-3 and args.training.model_ema is False and args.training.scale == [0.2, 1.0]
    assert args.training.weight_decay == 0.05 and args.model.model == "refiner-vit-s"


def test_without_data_arguments_the_embedded_recipe_is_used(monkeypatch):
    args = parse_args([], recipe_dirs=[RECIPES])
    assert args.data.uses_embedded_data
    assert args.training.recipe.endswith("embedded_fashion_mnist.yaml")
    assert args.model.config_overrides_dict()["image_size"] == 28
    # With a data argument (and a GPU), the defaults are the paper's S recipe values, not the embedded ones.
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    assert parse_args(["--dataset_name", "x"], recipe_dirs=[RECIPES]).training.lr == 5e-4


def test_an_unknown_recipe_key_is_an_error_naming_it(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("lr: 1.0e-3\nwarmup_epoch: 3\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown recipe key 'warmup_epoch'.*Did you mean warmup_epochs"):
        parse_args(["--recipe", str(recipe)])


@pytest.mark.parametrize(
    "line, message",
    [
        ("epochs: ten", r"`epochs: 'ten'` has the wrong type \(expected int\)"),
        ("lr: [1, 2]", r"`lr: \[1, 2\]` has the wrong type"),
        ("model_ema: 3", r"`model_ema: 3` has the wrong type \(expected bool\)"),
        ("scale: 0.5", r"`scale: 0.5` has the wrong type \(expected a list\)"),
        ("lr_schedule_unit: hourly", r"is not one of \['epoch', 'step'\]"),
        ("hub_token: secret", r"unknown recipe key 'hub_token': it may not be set in a recipe"),
        ("- a list", r"must be a mapping"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_errors(tmp_path, line, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(RecipeError, match=message):
        parse_args(["--recipe", str(recipe)])


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    recipe = tmp_path / "numbers.yaml"
    recipe.write_text("lr: 1e-3\nwarmup_lr: 1\nepochs: 40\n")  # YAML reads `1e-3` as a string
    args = parse_args(["--recipe", str(recipe)])
    training = args.training
    assert training.lr == 1e-3 and isinstance(training.warmup_lr, float) and training.epochs == 40


def test_a_missing_recipe_names_where_it_was_looked_for():
    with pytest.raises(RecipeError, match="not found"):
        parse_args(["--recipe", "no_such_recipe.yaml"], recipe_dirs=[RECIPES])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per_device_train_batch_size", "7"], "must be even"),
        (["--dataset_name", "a", "--train_dir", "b"], "either --dataset_name or --train_dir"),
        (["--model", "refiner-vit-s", "--model_name_or_path", "x"], "at most one of"),
        (["--warmup_epochs", "400"], "--warmup_epochs 400: must be below --epochs 300"),
        (["--scale", "1", "0.5"], "two numbers, low then high"),
        (["--config_overrides", "[1]"], "must be a JSON object"),
    ],
)
def test_inconsistent_arguments_are_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(
            argv + ["--dataset_name", "x"] if "--dataset_name" not in argv and "--train_dir" not in argv else argv
        )


def test_recipe_values_round_trip_through_a_recipe_file(tmp_path):
    args = parse_args(["--recipe", "embedded_fashion_mnist.yaml"], recipe_dirs=[RECIPES])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(args.recipe_values()))
    again = parse_args(["--recipe", str(dumped)])
    for key, value in args.recipe_values().items():
        other = again.recipe_values()[key]
        assert other == value or (isinstance(value, float) and math.isclose(other, value)), key


# The recipe in force


def test_a_bare_finetuning_run_uses_the_finetuning_recipe(monkeypatch):
    finetuning = load_recipe(RECIPES / "finetune_own_data.yaml")
    for data in ([], ["--dataset_name", "x"]):  # on the embedded data as on one's own
        args = parse_args(["--model_name_or_path", "some/model", *data], recipe_dirs=[RECIPES])
        assert args.training.recipe == str(RECIPES / "finetune_own_data.yaml")
        assert args.recipe_source.endswith("(the fine-tuning recipe: --model_name_or_path without --recipe)")
        assert {key: args.flat()[key] for key in finetuning} == finetuning
    # A short per-step schedule with a short warmup and no EMA, not the ImageNet pretraining's 300 epochs.
    training = args.training
    assert (training.epochs, training.warmup_epochs, training.lr_schedule_unit, training.model_ema) == (
        20,
        2,
        "step",
        False,
    )
    # The model's own resolution, architecture and image processor.
    assert args.model.image_size is None and args.model.config_overrides is None and args.model.crop_pct is None
    # A named recipe is the one used; a from-scratch run on one's data with a GPU uses the argument defaults, and
    # says so.
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    named = ["--model_name_or_path", "m", "--recipe", "refiner_vit_s_384_finetune.yaml", "--dataset_name", "x"]
    assert parse_args(named, recipe_dirs=[RECIPES]).training.lr == 5e-6
    scratch = parse_args(["--dataset_name", "x"], recipe_dirs=[RECIPES])
    assert scratch.training.recipe is None and scratch.recipe_source.startswith(
        "none: the argument defaults: the paper's Refiner-ViT-S ImageNet pretraining recipe"
    )


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv + ["--help"], recipe_dirs=[RECIPES])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_that_apply(capsys):
    bare = help_text([], capsys)
    assert "The defaults shown below are those of this run's recipe: " in bare
    assert "embedded_fashion_mnist.yaml (the embedded default run: no data, model or recipe argument)" in bare
    assert "--lr LR Peak learning rate. (default: 0.002)" in bare
    assert (
        "--epochs EPOCHS Epochs of the cosine schedule; training runs for epochs + cooldown_epochs. (default: 10)"
        in bare
    )

    finetuning = help_text(["--model_name_or_path", "m"], capsys)
    assert "finetune_own_data.yaml (the fine-tuning recipe" in finetuning
    assert "--lr LR Peak learning rate. (default: 0.001)" in finetuning

    imagenet = help_text(["--recipe", "refiner_vit_s.yaml"], capsys)
    assert (
        "--epochs EPOCHS Epochs of the cosine schedule; training runs for epochs + cooldown_epochs. (default: 300)"
        in imagenet
    )


# Usage errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "1e-3"], "unknown argument --learning_rate. Did you mean --lr?"),
        (["--num_train_epochs", "3"], "unknown argument --num_train_epochs. Did you mean --epochs?"),
        (["--batch-size", "8"], "unknown argument --batch-size. Did you mean --per_device_train_batch_size?"),
        (["--epoch", "3"], "unknown argument --epoch. Did you mean --epochs?"),  # no abbreviations
        (["--warmup", "3"], "unknown argument --warmup."),
        (["--warmup_epoch=3"], "unknown argument --warmup_epoch=3. Did you mean --warmup_epochs?"),
        (["--ignore_mismatched_sizes"], "--ignore_mismatched_sizes is no longer needed: a model whose classes differ"),
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten' (--help lists the arguments)."),
        (["--lr_schedule_unit", "hour"], "invalid choice: 'hour' (choose from 'epoch', 'step')"),
        (["--dataset_name", "x", "3"], "unexpected value '3': every value follows its --argument."),
        (["--train_dir", "/no/such/dir"], "--train_dir /no/such/dir: no such directory."),
        (
            ["--resume_from_checkpoint", "/no/such/step"],
            "--resume_from_checkpoint /no/such/step: no such directory. Give a",
        ),
    ],
)
def test_usage_errors_name_the_problem_and_the_fix(argv, message):
    with pytest.raises(UsageError) as error:
        parse_args(argv, recipe_dirs=[RECIPES])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"hiden_size": 10},
            "--config_overrides: 'hiden_size' is not a RefinerViTConfig field. Did you mean hidden_size?",
        ),
        ({"num_layers": 4}, "'num_layers' is not a RefinerViTConfig field."),
        ({"id2label": {"0": "a"}}, "`id2label` cannot be set: the class names come from the data set."),
    ],
)
def test_unknown_config_fields_are_errors(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(["--config_overrides", json.dumps(overrides)], recipe_dirs=[RECIPES])


def test_unknown_config_fields_in_a_recipe_name_the_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("config_overrides:\n  hidden_size: 64\n  hiden_size: 10\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: config_overrides: 'hiden_size' is not a RefinerViTConfig field"):
        parse_args(["--recipe", str(recipe)])


def test_a_field_given_twice_differently_is_an_error_not_a_silent_choice():
    from refiner_hf.training.model_setup import build_model

    argv = ["--recipe", "refiner_vit_s.yaml", "--dataset_name", "x", "--config_overrides", '{"image_size": 28}']
    args = parse_args(argv, recipe_dirs=[RECIPES])  # the recipe's --image_size is 224
    with pytest.raises(
        UsageError, match=r"sets image_size 28 but --image_size is 224: give it once \(--image_size 28\)"
    ):
        build_model(args.model, 10, None)
    argv[-1] = (
        '{"image_size": 32, "patch_size": 8, "hidden_size": 24, "num_attention_heads": 4, "num_hidden_layers": 4}'
    )
    args = parse_args(argv + ["--image_size", "32", "--drop_path", "0.3"], recipe_dirs=[RECIPES])
    config = build_model(args.model, 10, None).model.config
    assert (config.image_size, config.drop_path_rate) == (32, 0.3)
