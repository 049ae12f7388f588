"""Every command README.md and the pages of docs/ show in a code block composes: its module's primary
config (the one its @hydra.main names, in the config directory it names) with the command's overrides,
as Hydra's command line would compose it. A documented command that Hydra rejects (an override that is a
config group there, a key that no longer exists) fails here, named by its file and line. Nothing is run
and no checkpoint is read: `checkpoint=<file>` placeholders compose as strings. And every relative link
in those pages points at a file that exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import hydra
import pytest
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser  # as every @hydra.main uses them
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from balatro_train.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "balatro_train"
HYDRA_MAIN = re.compile(r"@hydra\.main\([^)]*config_path=(\w+)[^)]*config_name=\"(\w+)\"")
RUNS = re.compile(r"(^|\s)-m\s+balatro_train(\.\w+)?(\s|$)|(^|[\s;&|])balatro-train(\s|$)")  # what a command runs
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
LINK = re.compile(r"\[[^\[\]]*\]\(([^()\s]+)\)")  # [text](target), ![alt](image); the text may wrap lines


def documentation() -> list[Path]:
    """README.md and the topic pages it links to, docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands() -> list[tuple[str, int, str]]:
    """(file, line number, command) for each balatro_train command line in the fenced code blocks of
    README.md and docs/*.md, continuation lines (`\\`) joined; the file relative to the checkout."""
    return [
        (page.relative_to(REPO).as_posix(), number, command)
        for page in documentation()
        for number, command in page_commands(page)
    ]


def page_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for each balatro_train command line in one page's fenced code blocks."""
    commands, fenced, pending = [], False, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, None
            continue
        if not fenced:
            continue
        start, text = pending if pending else (number, "")
        text += line.rstrip().removesuffix("\\") + " "
        pending = (start, text) if line.rstrip().endswith("\\") else None
        if pending is None and RUNS.search(text.split("#")[0]):
            commands.append((start, " ".join(text.split())))
    return commands


def without_placeholders(command: str) -> str:
    """`outputs/<run>`, `<stage-1 run>`: what the reader replaces, made one plain word that Hydra's grammar
    takes (`<` and `>` are not in it) and the shell splits as the README means it."""
    return re.sub(r"<([^<>]+)>", lambda m: re.sub(r"\W+", "_", m[1]).strip("_"), command)


def invocations(command: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each balatro_train program the shell line runs: `python -m balatro_train[.x]`,
    `torchrun ... -m balatro_train`, or the installed `balatro-train` script."""
    found, words = [], shlex.split(without_placeholders(command), comments=True)
    segments, segment = [], []
    for word in words:
        if word in SHELL_SEPARATORS:
            segments, segment = [*segments, segment], []
        else:
            segment.append(word)
    for program in [*segments, segment]:
        if program and program[0] == "balatro-train":  # [project.scripts]: balatro_train.train:main
            found.append(("balatro_train", program[1:]))
            continue
        for n, word in enumerate(program[:-1]):
            if word == "-m" and re.fullmatch(r"balatro_train(\.\w+)?", program[n + 1]):
                found.append((program[n + 1], program[n + 2 :]))
                break
    return found


def primary_config(module: str) -> tuple[str, str] | None:
    """(config directory, config name) that the module's @hydra.main composes; None for a module
    without one (the report commands, which take a folder, not overrides)."""
    name = "balatro_train.train" if module == "balatro_train" else module  # __main__ runs train.main
    file = PACKAGE / f"{name.removeprefix('balatro_train.')}.py"
    assert file.is_file(), f"{module}: no such module in src/balatro_train"
    match = HYDRA_MAIN.search(file.read_text())
    if match is None:
        assert "@hydra.main" not in file.read_text(), f"{file}: its @hydra.main does not read as this test expects"
        return None
    return str(getattr(importlib.import_module(name), match[1])), match[2]


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's overrides for its first job: `a=1,2` -> `a=1`, `seed=range(4)` -> `seed=0`."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


@pytest.fixture(scope="module")
def saved_run_config(tmp_path_factory) -> Path:
    """A run's .hydra folder as the runner leaves it (config.yaml: the composed config, Hydra's own keys
    apart), for the README's `--config-dir outputs/<run>/.hydra --config-name config` re-runs."""
    folder = tmp_path_factory.mktemp("run") / ".hydra"
    folder.mkdir()
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(hydra.compose("train")))
    return folder


def also_search(config_dir: str, extra: Path) -> None:
    """Inside initialize_config_dir: search `extra` too, where `--config-dir` puts it (hydra's run_hydra);
    the README's `--config-dir outputs/<run>/.hydra` stands for a past run's, `saved_run_config`."""
    search_path = create_config_search_path(config_dir)
    search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()  # initialize_config_dir's exit restores what was there before
    Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)


COMMANDS = readme_commands()
assert any(page == "README.md" for page, _, _ in COMMANDS), (
    "README.md: no balatro_train command found in its code blocks; has this test's reading gone stale?"
)


@pytest.mark.parametrize("page,line,command", COMMANDS, ids=[f"{p}:{n}: {c}" for p, n, c in COMMANDS])
def test_readme_command_composes(page, line, command, saved_run_config, monkeypatch):
    monkeypatch.chdir(saved_run_config.parent)  # composing may make a run folder (`new_folder`): not in the checkout
    runs = invocations(command)
    assert runs, f"{page}:{line}: names balatro_train but runs none of its modules: {command}"
    for module, arguments in runs:
        config = primary_config(module)
        if config is None:
            continue  # a report command (openset, quality, sweep): it takes a folder, no overrides to compose
        config_dir, config_name = config
        try:
            args = get_args_parser().parse_args(arguments)  # an unknown flag: SystemExit, as on the command line
            overrides = first_of_sweeps(args.overrides)
            with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                if args.config_dir:
                    also_search(config_dir, saved_run_config)
                hydra.compose(args.config_name or config_name, overrides=overrides, return_hydra_config=True)
        except (Exception, SystemExit) as e:  # noqa: BLE001  (Hydra raises many kinds: the README line matters)
            pytest.fail(f"{page}:{line}: {command}\n  does not compose ({type(e).__name__}: {e})")


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of each relative markdown link or image outside code (fenced blocks and
    `inline code`), the `#anchor` dropped; web addresses and same-page anchors are not files."""
    prose, fenced = [], False
    for line in page.read_text().splitlines():
        fence = line.lstrip().startswith("```")
        fenced ^= fence
        prose.append("" if fenced or fence else re.sub(r"`[^`\n]*`", "``", line))  # the lines keep their numbers
    text, links = "\n".join(prose), []
    for match in LINK.finditer(text):
        path = match[1].split("#")[0]
        if path and not re.match(r"[a-z][a-z0-9+.-]*:", path):
            links.append((text.count("\n", 0, match.start()) + 1, path))
    return links


@pytest.mark.parametrize("page", documentation(), ids=lambda page: page.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    missing = [
        f"{page.relative_to(REPO).as_posix()}:{n}: {target}"
        for n, target in relative_links(page)
        if not (page.parent / target).exists()
    ]
    assert not missing, "links to files that do not exist:\n  " + "\n  ".join(missing)
