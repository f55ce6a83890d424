"""The docs stand on their own: every relative link in README.md and docs/ resolves to a file
inside the repository, and no file in the repository points at a path outside it."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Markdown links and images: [text](target) / ![alt](target); the target stops at a space or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def relative_targets(page: Path) -> list[str]:
    targets = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and in-page anchors
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for target in relative_targets(page):
        resolved = (page.parent / target).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links that do not resolve inside the repo: {broken}"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [the map](missing.md) and [site](https://example.org) [x](#top)\n")
    assert relative_targets(page) == ["missing.md"]


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    this_file = Path(__file__).resolve().relative_to(REPO).as_posix()
    outside = re.compile(r"\.\./shared\b|shared/DESIGN\.md")
    offenders = []
    for name in tracked:
        path = REPO / name
        if name == this_file or not path.is_file() or path.suffix in {".safetensors", ".png", ".model"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if outside.search(text):
            offenders.append(name)
    assert not offenders, f"files pointing outside the repository: {offenders}"


def test_the_readme_links_every_page_in_docs():
    """The README is the front door: every page in docs/ is reachable from it."""
    linked = {(REPO / target).resolve() for target in relative_targets(REPO / "README.md")}
    missing = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "docs").rglob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_manifests_are_valid_resources():
    """The minimal manifest of each resource in the README parses with the API models."""
    import yaml

    from kubetune.operator.api import parse_object

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    kinds = [parse_object(yaml.safe_load(block), "README.md").kind for block in blocks]
    assert kinds == ["FineTuneJob", "EvalJob", "ModelDeployment"]
