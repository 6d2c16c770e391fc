"""Recipes and the command's help: every key documented from the dataclasses, --help without torch, YAML files
and --key value overrides read through HfArgumentParser, unknown keys refused with the known ones."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fish_peft.cli.recipe import Recipe, SparseRecipe, load_recipe, parse_overrides
from fish_peft.cli.recipe_keys import show

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
HELP_RUNNER = (
    "import sys\nfrom fish_peft.cli.command import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as end:\n"
    "    print('exit', end.code, 'torch' in sys.modules, 'transformers' in sys.modules, 'peft' in sys.modules)"
)


def help_text(*args):
    """--help of `python -m fish_peft.cli`, and whether torch, transformers and peft got imported on the way."""
    plain = subprocess.run([sys.executable, "-m", "fish_peft.cli", *args], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    probe = subprocess.run([sys.executable, "-c", HELP_RUNNER, *args], capture_output=True, text=True, check=True)
    return plain.stdout, probe.stdout.splitlines()[-1]


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sparse-train", "--help"], ["push", "--help"]])
def test_help_answers_without_torch_transformers_or_peft(args):
    text, loaded = help_text(*args)
    assert "usage: fish-peft" in text
    assert loaded == "exit 0 False False False"


@pytest.mark.parametrize("command, recipe_cls", [("train", Recipe), ("sparse-train", SparseRecipe)])
def test_help_lists_every_recipe_key_with_its_meaning_default_and_allowed_values(command, recipe_cls):
    text, _ = help_text(command, "--help")
    entries = " " + " ".join(text.split("recipe keys:")[1].split())  # the key list, unwrapped
    for f in dataclasses.fields(recipe_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        entry = entries.split(f" {f.name} (", 1)[1].split(") ", 1)[1]
        assert entry.startswith(f"{f.metadata['help']}. Default: {show(default)}."), f.name
        if "choices" in f.metadata:
            assert f"Allowed: {' | '.join(show(c) for c in f.metadata['choices'])}." in entry, f.name


def test_every_shipped_recipe_loads():
    for path in sorted(RECIPES.rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue  # Accelerate's own config files
        recipe = load_recipe(path, recipe_cls=SparseRecipe if path.parent.name == "sparse" else Recipe)
        assert recipe.output_dir.startswith("outputs/"), path


def test_overrides_are_converted_to_each_keys_type():
    flags = ["--keep-ratio", "0.01", "--num_samples=32", "--text-columns", "a,b", "--mask-update", "topkast",
             "--save-dtype", "none", "--lr-by-method", "fish=2e-3,full=5e-5", "--max-train-samples", "none"]
    recipe = load_recipe(RECIPES / "glue" / "sst2.yaml", parse_overrides(flags))
    assert (recipe.keep_ratio, recipe.num_samples, recipe.text_columns) == (0.01, 32, ["a", "b"])
    assert (recipe.mask_update, recipe.save_dtype, recipe.max_train_samples) == ("topkast", None, None)
    assert recipe.lr_by_method == {"fish": 2e-3, "full": 5e-5}
    sparse = load_recipe(RECIPES / "sparse" / "digits_topkast.yaml", {"density": "0.2", "epochs": "3"}, SparseRecipe)
    assert (sparse.density, sparse.epochs, sparse.method) == (0.2, 3, "topkast")


@pytest.mark.parametrize("overrides, message", [
    ({"learnig_rate": "0.1"}, "unknown recipe key(s) ['learnig_rate']. Known keys: seed, task, model,"),
    ({"learnig_rate": "0.1"}, "batch_size_by_method and any TrainingArguments field."),
    ({"lr": "fast"}, "--lr: cannot read 'fast' as float"),
    ({"learning_rate": "fast"}, "--learning-rate: cannot read 'fast' as float"),
    ({"lr": "1e-3", "learning_rate": "1e-3"}, "lr and learning_rate name the same TrainingArguments field; keep one"),
    ({"save_total_limit": "3"}, "save_total_limit is set by the run itself"),
    ({"training": "x"}, "write TrainingArguments fields at the top level of the recipe"),
    ({"eval_strategy": "sometimes"}, "TrainingArguments refuses the recipe's training keys: sometimes is not a valid"),
    ({"learning_rate": "0"}, "learning_rate and num_train_epochs must be positive"),
    ({"method": "adapter"}, "method must be one of fish, random, full, lora, bitfit, lora_matched, shira, supertuning, shira_fish, got 'adapter'"),
    ({"mask_update": "rigl"}, "mask_update must be one of none, topkast, sparse_momentum"),
    ({"methods": "fish,prompt"}, "methods must be one of"),
    ({"fisher": "observed"}, "fisher must be one of empirical, expected"),
    ({"score": "snr"}, "score must be one of fisher, gradient_snr"),
    ({"score": "gradient_snr", "fisher": "expected"}, "score gradient_snr ranks the gradients at the gold labels"),
    ({"save_steps": "0"}, "save_steps must be at least 1"),
])
def test_bad_keys_and_values_are_refused_with_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as error:
        load_recipe(RECIPES / "glue" / "sst2.yaml", overrides)
    assert message in str(error.value)


def test_sparse_recipe_refuses_with_the_sparse_training_error():
    from fish_peft.dynamic.targets import SparseTrainingError

    with pytest.raises(SparseTrainingError, match="optimizer must be one of sgd, adam, got 'rmsprop'"):
        SparseRecipe(optimizer="rmsprop")
    with pytest.raises(SparseTrainingError, match="epochs must be at least 1"):
        SparseRecipe(epochs=0)


def test_allowed_values_written_out_for_help_agree_with_the_library():
    from fish_peft.cli import recipe
    from fish_peft.dynamic.densities import DISTRIBUTIONS
    from fish_peft.masks.fisher import FISHER_TYPES
    from fish_peft.masks.selection import SCORES, SELECTIONS
    from fish_peft.tuner.config import MASK_UPDATES, SAVE_DTYPES

    assert recipe.MASK_UPDATES == MASK_UPDATES and recipe.FISHER_TYPES == FISHER_TYPES
    assert recipe.SELECTIONS == SELECTIONS and recipe.DISTRIBUTIONS == DISTRIBUTIONS and recipe.SCORES == SCORES
    assert set(recipe.SAVE_DTYPES) == {None, *SAVE_DTYPES}


def test_training_arguments_fields_are_recipe_keys_passed_to_the_trainer(tmp_path):
    from fish_peft.cli.tasks import get_task
    from fish_peft.cli.training import training_arguments

    file = tmp_path / "recipe.yaml"
    file.write_text("task: sst2\nlr: 1.0e-3\nlr_scheduler_type: cosine\ngradient_accumulation_steps: '2'\n")
    recipe = load_recipe(file, parse_overrides(["--weight-decay", "0.1", "--epochs", "2", "--bf16", "false"]))
    assert recipe.training == {"learning_rate": 1e-3, "num_train_epochs": 2.0, "per_device_train_batch_size": 16,
                               "per_device_eval_batch_size": 64, "lr_scheduler_type": "cosine",
                               "gradient_accumulation_steps": 2, "weight_decay": 0.1, "bf16": False}
    args = training_arguments(recipe, tmp_path / "run", get_task("sst2"))
    assert (args.learning_rate, args.num_train_epochs, args.weight_decay, args.gradient_accumulation_steps) == (1e-3, 2, 0.1, 2)
    assert args.lr_scheduler_type == "cosine" and args.per_device_train_batch_size == 16 and args.seed == 0
    assert args.output_dir == str(tmp_path / "run" / "checkpoints") and args.eval_strategy == "epoch"
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again) == recipe  # a run's recipe.yaml reads back as the same recipe
