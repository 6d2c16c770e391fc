"""The README's set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [block.split("\n```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_demo_command_runs_the_demo():
    demo_command, _ = readme_commands()
    assert demo_command.endswith("fish-peft compare recipes/demo.yaml")
    assert "-c constraints.txt" in demo_command and "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
