"""The documentation stays navigable: docs/config.md matches skillstream/config.py, every relative
link in README.md and docs/*.md reaches a file (and a heading, when it names one), and the README
keeps CI's test command and its size limit."""
import re
import unicodedata
from pathlib import Path

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
README_TEST_COMMAND = "./setup.sh && .venv/bin/python -m pytest tests"  # .ci/run runs exactly this


def _generator():
    return load_script("docs/generate_reference.py")


def test_config_reference_is_generated_from_config_py():
    expected = _generator().generate()
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == expected, ("docs/config.md is out of date with skillstream/config.py: "
                                 "run .venv/bin/python docs/generate_reference.py")


def _without_code(text: str) -> str:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)                                     # inline code


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LMN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_reach_files_and_headings():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_keeps_the_test_command_and_its_size():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 6 * 1024, f"README.md is {len(readme)} bytes; the limit is 6 KB (move detail to docs/)"
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.decode("utf-8"), flags=re.S)
    assert README_TEST_COMMAND in [b.strip() for b in blocks[:2]], "README.md must open with CI's test command"
