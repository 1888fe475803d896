"""The README is a short guide whose every link, command, flag and config example works on the current code, and
docs/ is the reference it points to: links resolve, docs/extending.md names files and definitions that exist."""

import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "bench" / "RESULTS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(body: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", body, re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    body = re.sub(r"^```.*?^```", "", text(path), flags=re.M | re.S)  # a `# comment` in a code block is no heading
    return {slug(h) for h in re.findall(r"^#+ (.+)$", body, re.M)}


def test_slug_matches_githubs_anchors():
    assert slug("Checking a cache: `--verify`") == "checking-a-cache---verify"
    assert slug("demo (`bench/demo_seeds.py`)") == "demo-benchdemo_seedspy"
    assert slug("vLLM / GPU") == "vllm--gpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(text(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def test_every_docs_page_is_in_the_index_and_the_index_in_the_readme():
    index = text(ROOT / "docs" / "README.md")
    linked = set(LINK.findall(index))
    assert [p.name for p in DOCS if p.name != "README.md" and p.name not in linked] == []
    assert "docs/README.md" in LINK.findall(text(README))


def test_readme_is_a_short_guide():
    lines = text(README).splitlines()
    assert len(lines) <= 210, f"README has {len(lines)} lines; move reference material to docs/"
    sections = re.findall(r"^## (.+)$", text(README), re.M)
    for wanted in ("Install", "Quick start", "Your own data", "Commands", "Losses", "guarantees", "Numbers",
                   "Tests"):
        assert any(wanted in s for s in sections), wanted


def test_readme_cites_no_file_users_do_not_have():
    body = text(README)
    assert not re.search(r"REFERENCE( section| \d)", body)
    assert "../shared" not in body and "shared/" not in body
    for page in DOCS:
        assert "../shared" not in text(page), page.name


def test_the_test_command_is_stated_as_ci_runs_it():
    """.ci/run runs "the README's test command"; the README must state that command, and ./dev must have it."""
    body = text(README)
    assert re.search(r"^\./dev test\b", "\n".join(code_blocks(body, "bash")), re.M)
    assert re.search(r"^\./dev test$", text(ROOT / ".ci" / "run"), re.M)
    script = text(ROOT / "dev")
    assert re.search(r"^\s*demo\)", script, re.M) and re.search(r"^\s*test\)", script, re.M)
    assert re.search(r"^\s*setup\)", script, re.M)  # the README's install command


def _cli():
    from prefpipe.cli import cli
    return cli


def _subcommands(group: click.Group, prefix: str = "prefpipe") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _subcommands(cmd, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


def test_commands_table_lists_every_subcommand():
    body = text(README)
    table = body[body.index("## Commands"):body.index("## Losses")]
    rows = re.findall(r"^\| `([^`]+)`", table, re.M)
    listed = {" ".join(r.split()[:3]) if r.startswith("prefpipe data") else " ".join(r.split()[:2]) for r in rows}
    commands = _subcommands(_cli())
    assert len(commands) >= 8
    assert [c for c in commands if c not in listed] == []
    assert [c for c in listed if c.startswith("prefpipe") and c not in commands] == []


def _readme_prefpipe_commands() -> list[list[str]]:
    """Every `prefpipe ...` line of the README's bash blocks and command table, as argv."""
    body = text(README)
    lines = [ln for block in code_blocks(body, "bash") for ln in block.splitlines()]
    table = body[body.index("## Commands"):body.index("## Losses")]
    lines += [c for row in re.findall(r"^\| `([^|]+)` \|", table, re.M) for c in re.findall(r"[^`]+", row)
              if c.strip().startswith("prefpipe")]
    out = []
    for ln in lines:
        ln = ln.split("#")[0].strip()
        if ln.startswith("prefpipe ") and "..." not in ln:
            out.append(shlex.split(ln)[1:])
    return out


def test_readme_commands_parse_with_the_current_cli():
    """Every command line the README shows is accepted by the CLI as written: the subcommand exists, every flag
    exists, and the required options are there. (Parsing only; nothing runs.)"""
    argvs = _readme_prefpipe_commands()
    assert len(argvs) >= 8
    for argv in argvs:
        group, args = _cli(), list(argv)
        cmd = group
        # Under the group's own context, as the CLI runs them: click caches a command's help option from the first
        # context it sees, and a parentless one would leave `-h` off it for every later test.
        parent = click.Context(group, info_name="prefpipe", **group.context_settings)
        while isinstance(cmd, click.Group):
            name, args = args[0], args[1:]
            assert name in cmd.commands, f"no command {name!r}: prefpipe {' '.join(argv)}"
            cmd = cmd.commands[name]
        try:
            cmd.make_context(cmd.name, args, parent=parent)
        except click.UsageError as e:
            pytest.fail(f"prefpipe {' '.join(argv)}: {e.format_message()}")


def test_readme_flags_exist():
    """Every `--flag` the README names is an option of some prefpipe command (or of torchrun or pip)."""
    flags = set()
    for cmd in _all_commands(_cli()):
        for p in cmd.params:
            flags.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text(README)))
    assert "--loss_type" in named
    assert sorted(named - flags - {"--nproc_per_node", "--index-url"}) == []  # torchrun's, pip's


def _all_commands(group: click.Group):
    for cmd in group.commands.values():
        yield from _all_commands(cmd) if isinstance(cmd, click.Group) else [cmd]


def test_readme_losses_are_every_registered_loss():
    from prefpipe.train.registry import LOSS_TYPES
    body = text(README)
    section = body[body.index("## Losses"):body.index("## What prefpipe guarantees")]
    listed = set(re.findall(r"`([a-z_]+)`", section)) - {"sigmoid"}
    assert listed == set(LOSS_TYPES)


def test_quick_start_toml_loads_into_the_pipeline_config(tmp_path):
    from prefpipe.pipeline.config import resolve
    blocks = code_blocks(text(README), "toml")
    assert len(blocks) == 2  # the sweep, then the rounds
    p = tmp_path / "run.toml"
    p.write_text(blocks[0])
    (tmp_path / "sft").mkdir()
    cfg = resolve(str(p), {})
    assert cfg.settings.model == str(tmp_path / "sft") and cfg.settings.data == str(tmp_path / "prefs.jsonl")
    assert cfg.losses == ("dpo", "ipo") and cfg.betas == (0.05, 0.1, 0.3)
    t = cfg.train
    assert (t.optim.lr, t.loop.batch_size, t.loop.grad_accum, t.loop.save_every, t.source.input.max_length) == \
        (5e-7, 8, 4, 200, 1024)
    assert cfg.held_out.data == str(tmp_path / "heldout.jsonl")
    assert all(cfg.sources[k] == "file" for k in ("model", "loss_type", "lr", "eval_data"))


def test_rounds_toml_loads_into_the_pipeline_config(tmp_path):
    from prefpipe.pipeline.config import resolve
    p = tmp_path / "run.toml"
    p.write_text(code_blocks(text(README), "toml")[1])
    (tmp_path / "sft").mkdir()
    cfg = resolve(str(p), {})
    assert (cfg.settings.rounds, cfg.losses, cfg.betas, cfg.settings.reference_model) == \
        (3, ("1*dpo+1*sft",), (0.1,), "initial")
    g = cfg.generate
    assert (g.sampling.num_samples, g.sampling.max_new_tokens, g.judge.reward) == (8, 256, "answer")
    assert g.model == str(tmp_path / "sft") and g.data == cfg.settings.data
    assert cfg.held_out.gen == str(tmp_path / "heldout.jsonl")


EXTENDING_REF = re.compile(r"`((?:prefpipe|tests|docs|bench|\.ci)/[\w/.\-]+?)(?::(\w+))?`")


def test_extending_names_files_and_definitions_that_exist():
    refs = EXTENDING_REF.findall(text(ROOT / "docs" / "extending.md"))
    assert len(refs) >= 30
    missing = []
    for path, name in refs:
        if "NAME" in path:
            continue  # a placeholder for the new module
        f = ROOT / path
        if not f.exists():
            missing.append(path)
        elif name and not re.search(rf"^\s*(def |class )?{name}\b\s*[(:=]", text(f), re.M):
            missing.append(f"{path}:{name}")
    assert missing == []


def test_extending_covers_each_kind_of_change():
    heads = re.findall(r"^## (.+)$", text(ROOT / "docs" / "extending.md"), re.M)
    for kind in ("A loss", "An option", "A scoring backend", "An input format"):
        assert kind in heads


def test_docstrings_cite_no_reference_notes():
    """Help texts and docstrings state facts or papers, not the maintainers' notes file."""
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "prefpipe").rglob("*.py")
            if re.search(r"REFERENCE (section|\d)", p.read_text())]
    assert hits == []
