"""The README and docs/ stay true to the code: every relative link and image resolves, every command they show
(``python experiments/<script>.py <overrides>``, ``make <target>``) still composes or exists, and the README's
example policy runs and passes the policy checker.

Commands are composed with Hydra's compose API, as the entry points compose them, and never run. A Hydra
multirun (``-m``) composes once per value of every swept override. Shell placeholders are skipped explicitly:
a token ``...`` stands for "further overrides", and a ``key=<placeholder>`` override is checked for its key only.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

import adasched.sampling.policy as policy_module
from adasched.sampling.policy_check import check_policy
from tests.helpers import CONFIG_DIR, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"<[^<>=\s][^<>=]*>")  # <time>, <sweep_dir>, <fraction>: filled in by the reader
FURTHER_OVERRIDES = "..."  # a bare "..." in a command: "plus the overrides named in the text"
HYDRA_FLAGS = {"-m", "--multirun"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
# hydra/launcher configs whose base config comes from a Hydra plugin installed only with an extra (pyproject.toml).
LAUNCHER_PLUGINS = {"slurm": "hydra_plugins.hydra_submitit_launcher"}
# The README's example policy: its code and config are fenced blocks whose first line names the file.
EXAMPLE_CODE = "# policies/mask_threshold.py"
EXAMPLE_CONFIG = "# experiments/configs/policy/mask_threshold.yaml"


def without_fences(text: str) -> str:
    return FENCE.sub("", text)


# --- links -------------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(without_fences(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(doc: Path) -> list[str]:
    text = INLINE_CODE.sub("", without_fences(doc.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


LINKS = [(doc, target) for doc in DOCS for target in relative_links(doc)]


@pytest.mark.parametrize(("doc", "target"), LINKS, ids=[f"{d.relative_to(ROOT)}->{t}" for d, t in LINKS])
def test_relative_links_resolve(doc: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (doc.parent / path).resolve() if path else doc
    assert resolved.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor:
        assert resolved.suffix == ".md", f"{doc.relative_to(ROOT)}: anchor on a non-Markdown file in {target}"
        assert anchor in anchors(resolved), f"{doc.relative_to(ROOT)}: no heading for #{anchor} in {path or doc.name}"


def test_the_docs_link_each_other() -> None:
    """Every page in docs/ is reachable from the README, directly or through another page."""
    reachable, frontier = set(), [ROOT / "README.md"]
    while frontier:
        doc = frontier.pop()
        for target in relative_links(doc):
            path = (doc.parent / target.partition("#")[0]).resolve()
            if path.suffix == ".md" and path.exists() and path not in reachable:
                reachable.add(path)
                frontier.append(path)
    assert {d.resolve() for d in DOCS[1:]} <= reachable, "pages no link reaches: " + ", ".join(
        str(d.relative_to(ROOT)) for d in DOCS[1:] if d.resolve() not in reachable
    )


# --- commands ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    doc: Path
    tokens: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}: {shlex.join(self.tokens)}"


def shell_snippets(text: str) -> list[str]:
    """Lines of shell fenced blocks (continuations joined) and every inline code span, newlines as spaces."""
    snippets = []
    for language, body in FENCE.findall(text):
        if language in SHELL_LANGUAGES:
            snippets += body.replace("\\\n", " ").splitlines()
    snippets += [span.replace("\n", " ") for span in INLINE_CODE.findall(without_fences(text))]
    return snippets


def commands(kind: str) -> list[Command]:
    """Commands starting with ``python experiments/`` (kind "python") or ``make`` (kind "make"), in every doc."""
    found = []
    for doc in DOCS:
        for snippet in shell_snippets(doc.read_text(encoding="utf-8")):
            start = snippet.find("python experiments/") if kind == "python" else (0 if re.match(r"make(\s|$)", snippet.strip()) else -1)
            if start < 0:
                continue
            tokens = []
            for token in shlex.split(snippet[start:].strip(), comments=True):
                if token in SHELL_SEPARATORS:
                    break
                tokens.append(token)
            found.append(Command(doc, tuple(tokens)))
    return list(dict.fromkeys(found))


PYTHON_COMMANDS = commands("python")
MAKE_COMMANDS = commands("make")


def test_the_docs_show_the_main_commands() -> None:
    shown = {c.tokens[:2] for c in MAKE_COMMANDS if c.doc.name == "README.md"}
    assert {("make", "demo"), ("make", "test")} <= shown
    assert len(PYTHON_COMMANDS) > 30, "the command extraction found too few commands to be working"


def has_make_rule(target: str) -> bool:
    """Whether make knows how to build ``target``: asked of make itself (``-n`` runs nothing), so targets
    that variables or pattern rules spell out count too."""
    result = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), target], capture_output=True, text=True)
    return "No rule to make target" not in result.stderr


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=str)
def test_make_targets_exist(command: Command) -> None:
    targets = [t for t in command.tokens[1:] if not t.startswith("-") and "=" not in t and not t.isdigit()]
    missing = [target for target in targets if not has_make_rule(target)]
    assert not missing, f"{command}: no Makefile target {missing}"


@pytest.fixture(scope="module")
def hydra_configs():
    """Compose configs of experiments/configs (the entry points' config dir) inside one Hydra context."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield compose


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is absent too
        return False


def overrides_to_compose(command: Command, overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """The override lists to compose (one per swept value under -m) and the keys given as placeholders."""
    multirun = any(flag in command.tokens for flag in HYDRA_FLAGS)
    placeholder_keys, kept = [], []
    for override in overrides:
        if override == FURTHER_OVERRIDES:
            continue
        if PLACEHOLDER.search(override):
            key = override.partition("=")[0]
            assert not PLACEHOLDER.search(key), f"{command}: placeholder in a key: {override}"
            placeholder_keys.append(key.lstrip("+~"))
            continue
        group, _, choice = override.partition("=")
        plugin = LAUNCHER_PLUGINS.get(choice) if group == "hydra/launcher" else None
        if plugin and not installed(plugin):  # optional extra not installed: check the config file only
            assert (CONFIG_DIR / "hydra" / "launcher" / f"{choice}.yaml").is_file(), f"{command}: no {override}"
            continue
        kept.append(override)
    parsed = OverridesParser.create().parse_overrides(kept)
    sweeps = [(i, list(o.sweep_string_iterator())) for i, o in enumerate(parsed) if o.is_sweep_override()]
    assert multirun or not sweeps, f"{command}: sweep values {[parsed[i].input_line for i, _ in sweeps]} need -m"
    # every swept override at its first value, then each value of each sweep in turn
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line for o in parsed]
    variants = [first] + [[*first[:i], f"{parsed[i].get_key_element()}={value}", *first[i + 1 :]] for i, values in sweeps for value in values[1:]]
    return variants, placeholder_keys


def config_has(cfg, key: str) -> bool:
    return (CONFIG_DIR / key).is_dir() or OmegaConf.select(cfg, key, default="<absent>") != "<absent>"


@pytest.mark.parametrize("command", PYTHON_COMMANDS, ids=str)
def test_python_commands_compose(command: Command, hydra_configs, tmp_path: Path) -> None:
    script = ROOT / command.tokens[1]
    assert script.is_file(), f"{command}: no script {command.tokens[1]}"
    arguments = [t for t in command.tokens[2:] if t not in HYDRA_FLAGS]
    config = CONFIG_DIR / f"{script.stem}.yaml"
    if not config.is_file():  # an argparse script: its options must exist
        source = script.read_text(encoding="utf-8")
        for option in (a for a in arguments if a.startswith("--")):
            assert f'"{option.split("=")[0]}"' in source, f"{command}: {script.name} has no option {option}"
        return
    extra = example_policy_search_path(command, tmp_path)
    variants, placeholder_keys = overrides_to_compose(command, arguments)
    for overrides in variants:
        try:
            cfg = hydra_configs(config_name=script.stem, overrides=overrides + extra)
        except Exception as error:  # noqa: BLE001  (any composition error is the finding)
            pytest.fail(f"{command}\n  does not compose with {overrides}: {type(error).__name__}: {error}")
        for key in placeholder_keys:
            assert config_has(cfg, key), f"{command}: no key {key} in {script.stem}.yaml"


# --- the README's example policy ---------------------------------------------------------------------------


def readme_block(first_line: str) -> str:
    blocks = [body for _, body in FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8")) if body.startswith(first_line + "\n")]
    assert len(blocks) == 1, f"README.md should hold one fenced block starting with {first_line!r}"
    return blocks[0]


def example_policy_name() -> str:
    return OmegaConf.create(readme_block(EXAMPLE_CONFIG)).name


def example_policy_search_path(command: Command, tmp_path: Path) -> list[str]:
    """A command running the README's example policy composes with its config from the README."""
    shipped = {f"policy={p.stem}" for p in (CONFIG_DIR / "policy").glob("*.yaml")}
    if not any(t.startswith("policy=") and t not in shipped for t in command.tokens):
        return []  # not the example: the README is read only for commands naming a policy with no config file
    if f"policy={example_policy_name()}" not in command.tokens:
        return []
    folder = tmp_path / "configs" / "policy"
    folder.mkdir(parents=True)
    (folder / f"{example_policy_name()}.yaml").write_text(readme_block(EXAMPLE_CONFIG), encoding="utf-8")
    return [f"hydra.searchpath=[file://{tmp_path / 'configs'}]"]


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the example in a copy of the policy registry, so no other test sees it."""
    monkeypatch.setattr(policy_module, "_REGISTRY", dict(policy_module._REGISTRY))


def test_the_readme_example_policy_runs(scratch_registry: None, hydra_configs, tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(compile(readme_block(EXAMPLE_CODE), "README.md (policies/mask_threshold.py)", "exec"), namespace)
    name = example_policy_name()
    assert name in policy_module.registered_policies()
    overrides = [f"policy={name}", *example_policy_search_path(Command(ROOT / "README.md", ("python", "experiments/run.py", f"policy={name}")), tmp_path)]
    policy = instantiate(hydra_configs(config_name="run", overrides=overrides).policy)  # as the entry points build it
    assert type(policy).__name__ in namespace
    for num_models in (2, 3):
        check_policy(policy, num_models=num_models)
    policy.reset(num_steps=10, num_models=2)
    row = lambda fraction: policy.act(policy_state(fraction))  # noqa: E731
    assert row(1.0).item() == 1 and row(0.0).item() == 0, "light while mostly masked, heavy at the end"


def policy_state(mask_fraction: float) -> policy_module.DenoiseState:
    one = torch.ones(1, dtype=torch.float64)
    return policy_module.DenoiseState(
        num_steps=10, step=torch.zeros(1, dtype=torch.int64), t=one, mask_fraction=one * mask_fraction,
        previous_mask_fraction=one, reveal_count=torch.ones(1, dtype=torch.int64), flops=one * 0, all_heavy_flops=one * 0,
        model_flops=(3.0, 1.0), last_action=torch.full((1,), -1), last_entropy=one * float("nan"), seeds=torch.zeros(1, dtype=torch.int64),
    )
