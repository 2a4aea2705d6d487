"""Real text shipped with the package, for tests, benchmarks and examples that must run offline.

`alice_in_wonderland.txt`: Lewis Carroll, "Alice's Adventures in Wonderland" (1865), public domain; the
Project Gutenberg text (eBook #11) without its licence header, as kept in the learntextvis/textkit repository.
"""

from importlib import resources


def sample_text(name: str = "alice_in_wonderland") -> str:
    """The text of a shipped sample (default: Alice's Adventures in Wonderland, ~144k characters)."""
    return resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
