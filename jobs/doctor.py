"""``cascade doctor`` and ``cascade flavors``: what is installed, which models exist, what hardware is here."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
import time

PACKAGES = (
    "cascade-data",
    "torch",
    "torchvision",
    "ray",
    "pyarrow",
    "webdataset",
    "img2dataset",
    "open_clip_torch",
    "transformers",
    "safetensors",
    "fsspec",
    "s3fs",
    "diffusers",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages this project relies on ("not installed" where absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def flavor_table(family: str | None = None) -> list[tuple[str, int, str]]:
    """(name, exact parameter count, official weights file) for every flavor, counted on the meta device."""
    from stages.flavors import FLAVORS

    rows = []
    for name, flavor in FLAVORS.items():
        if family is None or flavor.family == family:
            rows.append((name, flavor.num_params(), flavor.files[0] if flavor.files else "random init only"))
    if not rows:
        families = sorted({f.family for f in FLAVORS.values()})
        raise ValueError(f"unknown family {family!r}; known: {', '.join(families)}")
    return rows


def print_flavors(family: str | None = None) -> None:
    rows = flavor_table(family)
    width = max(len(r[0]) for r in rows)
    print(f"{'flavor':<{width}}  {'parameters':>15}  weights file")
    for name, count, file in rows:
        print(f"{name:<{width}}  {count:>15,}  {file}")


def cuda_status() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} device(s): {', '.join(names)}; bf16 supported: {torch.cuda.is_bf16_supported()}"


def ray_status() -> str:
    """Connect to the cluster in RAY_ADDRESS, or start a throwaway local Ray, and report its resources."""
    import os

    import ray

    started = time.perf_counter()
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level="ERROR")
        else:
            ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
        resources = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
    except Exception as exc:  # report, do not crash the doctor
        return f"unavailable: {type(exc).__name__}: {exc}"
    finally:
        ray.shutdown()
    where = address or "local (started for this check)"
    summary = ", ".join(
        f"{k}={v / 2**30:.1f} GiB" if "memory" in k else f"{k}={v:g}"
        for k, v in sorted(resources.items())
        if not k.startswith("node:")
    )
    return f"ok at {where}: {nodes} node(s), {summary} ({time.perf_counter() - started:.1f} s)"


def run_doctor(check_ray: bool = True) -> int:
    print("cascade-data doctor")
    print(f"platform: {platform.platform()} ({sys.executable})")
    print("\nversions:")
    for name, version in package_versions().items():
        print(f"  {name:<16} {version}")
    print(f"\ncuda: {cuda_status()}")
    print(f"ray: {ray_status() if check_ray else 'skipped (--no-ray)'}")
    print("\nflavors (tiny flavors are seeded random weights for tests and the demo):")
    print_flavors()
    return 0
