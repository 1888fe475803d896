"""The README speaks to users: it cites nothing they do not have, and its two first-run commands exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_cites_no_file_users_do_not_have():
    text = (ROOT / "README.md").read_text()
    assert not re.search(r"REFERENCE( section| \d)", text)
    assert "../shared" not in text and "shared/" not in text


def test_readme_first_run_commands_exist():
    text = (ROOT / "README.md").read_text()
    assert "./dev demo" in text and "./dev test" in text
    script = (ROOT / "dev").read_text()
    assert re.search(r"^\s*demo\)", script, re.M) and re.search(r"^\s*test\)", script, re.M)


def test_docstrings_cite_no_reference_notes():
    """Help texts and docstrings state facts or papers, not the maintainers' notes file."""
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "prefpipe").rglob("*.py")
            if re.search(r"REFERENCE (section|\d)", p.read_text())]
    assert hits == []
