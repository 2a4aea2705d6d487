"""Real text shipped with the package, for tests, benchmarks and examples that must run offline.

`alice_in_wonderland.txt`: Lewis Carroll, "Alice's Adventures in Wonderland" (1865), public domain; the
Project Gutenberg text (eBook #11) without its licence header, as kept in the learntextvis/textkit repository.

`python_reference.txt`: a second domain (technical documentation, not fiction) for checking that a method
calibrated on the book generalises: fifteen sections of "The Python Language Reference" (execution model,
naming, exceptions, import, class and function definitions, compound statements, ...), as CPython 3.11.7
ships them in `pydoc_data.topics`. Copyright (c) 2001 Python Software Foundation; all rights reserved;
distributed under the PSF License Agreement (https://docs.python.org/3/license.html).
"""

import re
from importlib import resources

ALICE_CALIB_FRACTION = 0.75  # the first 75% calibrates and trains; the rest is held out for evaluation


def sample_text(name: str = "alice_in_wonderland") -> str:
    """The text of a shipped sample (default: Alice's Adventures in Wonderland, ~144k characters)."""
    return resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")


def alice_split() -> tuple[str, str]:
    """The shipped text cut at a paragraph boundary: (calibration / training part, held-out part)."""
    text = sample_text()
    cut = text.rfind("\n\n", 0, int(len(text) * ALICE_CALIB_FRACTION))
    return text[:cut], text[cut:]


def chapters(text: str) -> list[str]:
    """`text` cut before each "CHAPTER" heading (the documents of a training run on the shipped text)."""
    parts = re.split(r"(?=^CHAPTER )", text, flags=re.M)
    return [p for p in parts if p.strip()]
