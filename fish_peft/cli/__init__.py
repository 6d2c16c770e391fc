"""The `fish-peft` command: recipes, data and tasks, a run from recipe to output folder, comparisons, resume and
the offline demo. The top layer: nothing else in fish_peft imports it."""


def __getattr__(name: str):
    if name == "main":
        from fish_peft.cli.command import main

        return main
    raise AttributeError(f"module 'fish_peft.cli' has no attribute {name!r}")
