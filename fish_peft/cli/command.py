"""The `fish-peft` command: train, mask, eval and compare from YAML recipes; push a run to the Hub."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

from fish_peft.cli.lr_search import DEFAULT_LR_GRIDS, SPARSE_LR_GRID, TUNING_FOLDER, show_lr
from fish_peft.cli.recipe import METHODS, Recipe, SparseRecipe, load_recipe, parse_overrides
from fish_peft.cli.recipe_keys import convert_value, describe_keys
from fish_peft.cli.sft_recipe import SFTRecipe

# Only the standard library and fish_peft.cli.recipe load before the arguments are parsed: `--help` needs no torch.


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from fish_peft.distributed.processes import leave_process_group
    from fish_peft.hub.push import HubError

    try:
        status = args.handler(args, parse_overrides(rest))
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ImportError) as err:
        print(f"fish-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except HubError as err:
        print(f"fish-peft {args.command}: error: {err}", file=sys.stderr)
        return 1
    leave_process_group()  # under `accelerate launch`: all processes finish together
    return status


def keys_help(recipe_cls: type = Recipe, sft: bool = False) -> str:
    """The epilog of a command that reads a recipe: how to override a key, then every key with its default (and,
    with `sft`, the keys of SFT recipes)."""
    example = "--learning-rate 1e-3 --method lora --text-columns sentence1,sentence2 --lr-by-method fish=2e-3,full=5e-5"
    if recipe_cls is SparseRecipe:
        example = "--density 0.1 --method topkast"
    how = f"Any recipe key can be overridden as --key value (dashes or underscores; none empties an optional key), e.g. {example}."
    text = f"{textwrap.fill(how, 100, break_on_hyphens=False)}\n\nrecipe keys:\n{describe_keys(recipe_cls)}"
    if sft:
        what = ("A recipe with task: sft fine-tunes a causal LM with TRL's SFTTrainer (pip install fish-peft[trl]); its "
                "keys are these, and its TrainingArguments fields are those of TRL's SFTConfig (max_length, packing, ...).")
        text += f"\n\n{textwrap.fill(what, 100, break_on_hyphens=False)}\n\nSFT recipe keys:\n{describe_keys(SFTRecipe)}"
    return text


def _command(commands, name: str, handler: Callable, help: str, recipe_cls: Optional[type] = Recipe, sft: bool = False):
    """A subcommand whose description is its handler's docstring and whose epilog lists `recipe_cls`'s keys."""
    command = commands.add_parser(
        name, help=help, description=inspect.cleandoc(handler.__doc__),
        epilog=keys_help(recipe_cls, sft) if recipe_cls else None, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # recipe keys pass through: --lr is no --lr-grid, --seed no --seeds, --method no --methods
    )
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fish-peft", description="Sparse fine-tuning with FISH masks on top of PEFT.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = _command(commands, "train", train_command, "fine-tune one method as a recipe says", sft=True)
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/glue/sst2.yaml or recipes/sft/tiny_offline.yaml")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder (its own files; yours stay)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")

    mask = _command(commands, "mask", mask_command, "compute and save a mask and its per-module report")
    mask.add_argument("recipe")
    mask.add_argument("--overwrite", action="store_true", help="replace a mask already in the output folder")

    evaluate = _command(commands, "eval", eval_command, "evaluate a saved run")
    evaluate.add_argument("run_dir", help="output folder of `fish-peft train`")

    compare = _command(commands, "compare", compare_command, "run several methods and tabulate them", sft=True)
    compare.add_argument("recipe")
    compare.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: the recipe's `methods`)")
    grids = ", ".join(f"{method} {':'.join(map(show_lr, grid))}" for method, grid in DEFAULT_LR_GRIDS.items())
    compare.add_argument(
        "--lr-grid", action="store_true", default=None,
        help="each method first chooses its learning rate from a grid (lr_grid_by_method, else a default grid: "
        f"{grids}; the sparse methods {':'.join(map(show_lr, SPARSE_LR_GRID))}), every point trained on the "
        "training data but a held-out tuning split (tuning_share, default 0.1) and scored on it, never on the "
        "validation split; the chosen one then trains on all the training data (recipe key lr_grid). The grid's runs "
        f"go to OUTPUT_DIR/{TUNING_FOLDER}/METHOD/lr=LR",
    )
    compare.add_argument(
        "--seeds", help="comma-separated seeds every method runs with, e.g. 0,1,2: the table shows mean ± std over "
        "them and the runs go to OUTPUT_DIR/seed=SEED/METHOD (recipe key seeds; default: the recipe's seed)",
    )
    compare.add_argument("--overwrite", action="store_true", help="run a comparison in its folder again (its own files; yours stay)")

    sparse = _command(
        commands, "sparse-train", sparse_train_command, "train a network from scratch with Top-KAST or sparse momentum",
        SparseRecipe,
    )
    sparse.add_argument("recipe", help="YAML recipe, e.g. recipes/sparse/digits_sparse_momentum.yaml")
    sparse.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    sparse.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch checkpoint")

    push = _command(commands, "push", push_command, "upload a run's adapter with its model card to the Hub", None)
    push.add_argument("run_dir", help="output folder of `fish-peft train` (or a folder `save_pretrained` wrote)")
    push.add_argument("repo_id", help="Hub repository, e.g. alice/minilm-sst2-fish (created if missing)")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--revision", help="branch to push to (created from main if missing)")
    push.add_argument("--commit-message")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--base-model", help="Hub id of the base model, when the run names a local folder")
    push.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0)")
    push.add_argument("--tag", action="append", dest="tags", default=[], help="extra card tag (repeatable)")
    return parser


def train_command(args, overrides) -> int:
    """Fine-tune with one method (fish, random, full, lora, bitfit) and write the adapter, results.json, the mask
    plot and a model card into the recipe's output_dir. A recipe with task: sft fine-tunes a causal LM on chat or
    prompt/completion data with TRL's SFTTrainer (fish, random, lora, full), and results.json also holds the
    validation loss, perplexity and a few generations. Checkpoints (every epoch, and every save_steps steps) let
    --resume continue a run that died, ending with the same adapter."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it: choose one.")
    recipe = load_recipe(args.recipe, overrides)
    if isinstance(recipe, SFTRecipe):
        from fish_peft.cli.sft_training import run_sft as run
    else:
        from fish_peft.cli.training import run
    results = run(recipe, overwrite=args.overwrite, resume=args.resume)
    print(json.dumps({"metrics": results["metrics"], "trainable_parameters": results["trainable_parameters"]}, indent=2))
    return 0


def mask_command(args, overrides) -> int:
    """Compute the recipe's mask (fish by default; random and bitfit too) without training and save mask.safetensors,
    mask_report.json and mask.png in a folder of their own: --output-dir, else the recipe's output_dir with "-mask"
    added (outputs/glue/cola-mask), since the recipe's output_dir is where its run or comparison goes and a mask's
    mask.png would mix with theirs. A folder that holds anything else is refused."""
    from fish_peft.utils.atomic_files import atomic_folder
    from fish_peft.hub.mask_plot import plot_mask
    from fish_peft.cli.output_folders import MASK, check_output_folder
    from fish_peft.cli.run_output import write_json
    from fish_peft.cli.training import build_mask_only

    recipe = load_recipe(args.recipe, overrides)
    if isinstance(recipe, SFTRecipe):
        raise ValueError(
            f"{args.recipe} is an SFT recipe, whose FISH mask is computed when its training starts, from the Fisher of "
            "its training loss: `fish-peft train` saves it in the adapter and results.json. `fish-peft mask` takes "
            "classification recipes."
        )
    if "output_dir" not in overrides:
        recipe = dataclasses.replace(recipe, output_dir=f"{recipe.output_dir}-mask")
    out = Path(recipe.output_dir)
    check_output_folder(out, MASK, elsewhere=f"{out}-mask")
    if MASK.found_in(out) and not args.overwrite:
        raise FileExistsError(f"{out} already holds a mask; pass --overwrite to replace it or choose another --output-dir, e.g. {out}-mask.")
    start = time.perf_counter()
    mask, shapes = build_mask_only(recipe)
    seconds = time.perf_counter() - start
    with atomic_folder(out, owns=MASK.owns) as staging:  # the three files change together; others there stay
        mask.save(str(staging / "mask.safetensors"))
        write_json(staging / "mask_report.json", {"selected": mask.num_selected, "seconds": seconds, **mask.info, "parameters": mask.report()})
        plot_mask(mask, str(staging / "mask.png"), title=f"{recipe.method} mask, {recipe.task}", shapes=shapes)
    print(f"{mask} in {seconds:.1f}s -> {out}")
    for row in sorted(mask.report(), key=lambda r: -r["selected"])[:10]:
        print(f"  {row['parameter']:<60} {row['selected']:>9,} of {row['size']:>11,} ({row['density']:.3%})")
    return 0


def eval_command(args, overrides) -> int:
    """Evaluate a run's saved adapter (or model) on the validation split(s) of its recipe; --validation-file and
    other keys override the recipe saved with the run."""
    from fish_peft.cli.training import evaluate_run

    print(json.dumps(evaluate_run(Path(args.run_dir), overrides), indent=2))
    return 0


def compare_command(args, overrides) -> int:
    """Run the recipe once per method (and per seed of --seeds) on the same data, loop and evaluation, each at its
    own learning rate: from `lr_by_method`, or with --lr-grid the best of a grid on a tuning split held out of the
    training data. Write comparison.md (an aligned table with mean ± std, the best method and whether its lead is
    larger than the noise, what the columns mean and where the files went) and comparison.json into output_dir,
    and print comparison.md."""
    from fish_peft.cli.comparison import compare

    recipe = load_recipe(args.recipe, overrides)
    if args.lr_grid or args.seeds is not None:
        if isinstance(recipe, SFTRecipe):
            raise ValueError("--lr-grid and --seeds take classification recipes; an SFT recipe compares its methods at "
                             "their lr_by_method values, with one seed.")
        seeds = recipe.seeds if args.seeds is None else convert_value("seeds", args.seeds, Optional[list[int]])
        recipe = dataclasses.replace(recipe, lr_grid=recipe.lr_grid or args.lr_grid is True, seeds=seeds)
    if getattr(recipe, "lr_grid", False) and {"lr", "learning_rate"} & overrides.keys():
        raise ValueError("--lr-grid chooses each method's learning rate; drop --lr / --learning-rate, or --lr-grid.")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(recipe.methods)
    recipe = dataclasses.replace(recipe, methods=methods)
    table = compare(recipe, overwrite=args.overwrite)
    if table:
        print(table)
    return 0


def push_command(args, overrides) -> int:
    """Upload a run's adapter (the sparse diff and the head), recipe, results and mask plot to a Hub repository
    with a model card written for it. The token comes from `hf auth login` or HF_TOKEN."""
    from fish_peft.hub.push import push_adapter

    if overrides:
        raise ValueError(f"push takes no recipe keys, got {', '.join('--' + k for k in overrides)}.")
    card = {"license": args.license}
    if args.base_model:
        card["base_model"] = args.base_model
    commit = push_adapter(
        args.run_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        create_pr=args.create_pr, tags=args.tags, **card,
    )
    print(json.dumps({"repo_id": args.repo_id, "revision": args.revision or "main", "commit_url": commit.commit_url}, indent=2))
    return 0


def sparse_train_command(args, overrides) -> int:
    """Train a network from scratch at a fixed density (dense, static random mask, sparse momentum or Top-KAST) in
    an Accelerate loop (one process, or several under `accelerate launch`), and write results.json and the sparse
    model (sparse_model.safetensors: indices + values) into output_dir."""
    from fish_peft.cli.sparse_train import train_sparse

    recipe = load_recipe(args.recipe, overrides, SparseRecipe)
    results = train_sparse(recipe, overwrite=args.overwrite, resume=args.resume)
    print(json.dumps({k: results[k] for k in ("test_accuracy", "density", "mask_updates", "mask_update_share")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
