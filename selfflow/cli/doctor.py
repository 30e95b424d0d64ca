"""selfflow-doctor: what works on this machine: package versions, CUDA, attention kernels,
torchaudio's native library, PyAV's codecs and the local weights and caches selfflow finds. Exit
status 1 when a package that every run needs does not work.

  selfflow-doctor
  selfflow-doctor --json     # the same as one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from selfflow.dependencies import DEPENDENCIES, import_problem, installed_version


def package_rows() -> list[dict]:
    """One row per dependency: version, whether it imports, and the fix where it does not."""
    rows = []
    for dependency in DEPENDENCIES:
        version = installed_version(dependency.package)
        problem = import_problem(dependency.module) if version else None
        status = "ok" if version and not problem else "missing" if not version else "broken"
        row = {
            "name": dependency.package,
            "version": version,
            "status": status,
            "for": dependency.needed_for,
        }
        if status != "ok":
            row["fix"] = problem if problem else dependency.install_hint()
        row["required"] = dependency.extra is None
        rows.append(row)
    return rows


def _torch_device() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU only ({os.cpu_count()} cores); bf16 autocast on CPU"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"CUDA {torch.version.cuda}: {names}; bf16 {torch.cuda.is_bf16_supported()}"


def _flex_attention() -> str:
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

    return "imports (model.attention=flex or auto: masked attention on CUDA)"


def _mel_spectrogram() -> str:
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=8000, n_fft=256, n_mels=32)(
        torch.randn(8000)
    )
    return f"native library loads; a mel spectrogram computes {tuple(mel.shape)}"


def _video_codecs() -> str:
    import av

    writer = "H.264 writer found" if "libx264" in av.codecs_available else "no H.264 writer"
    codec = ".".join(map(str, av.library_versions["libavcodec"]))
    return f"PyAV's bundled FFmpeg (libavcodec {codec}); {writer}"


def _local_weights() -> str:
    cache = Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))
    kept = sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    hub = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
    models = sorted(p.name for p in hub.glob("models--*")) if hub.is_dir() else []
    return f"{cache}: {', '.join(kept) or 'empty'}; hub cache {hub}: {len(models)} models"


CHECKS: dict[str, Callable[[], str]] = {
    "device": _torch_device,
    "FlexAttention": _flex_attention,
    "torchaudio": _mel_spectrogram,
    "video": _video_codecs,
    "local weights": _local_weights,
}


def run_checks() -> dict[str, str]:
    """Each check's one-line finding, or what failed."""
    found = {}
    for name, check in CHECKS.items():
        try:
            found[name] = check()
        except Exception as error:
            found[name] = (
                f"FAILS: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfflow-doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "selfflow": installed_version("selfflow"),
        "packages": package_rows(),
        "checks": run_checks(),
    }
    broken = [
        row["name"] for row in report["packages"] if row["required"] and row["status"] != "ok"
    ]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"selfflow {report['selfflow']}, Python {report['python']}, {report['platform']}")
        for row in report["packages"]:
            extra = "" if row["status"] == "ok" else f"  -> {row['fix']}"
            print(f"  {row['name']:<16} {row['version'] or '-':<14} {row['status']:<8}{extra}")
        for name, finding in report["checks"].items():
            print(f"  {name:<16} {finding}")
        print("all required packages work" if not broken else f"not working: {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
