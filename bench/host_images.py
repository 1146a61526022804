"""What copying an image to a host with storage of its own costs: Twarga's copy through
libvirt (``virt.host_images.HostImageCache``: a ``twarga-images`` storage pool, one
volume per file, a stream upload of each, then the marker) vs. the same bytes copied with
``shutil.copyfile`` on this machine, and vs. a second ``ensure`` of the same image (what
every VM after the first pays: a marker lookup).

The libvirt side talks to qemu:///system over its UNIX socket, as it would to a remote
host over ``qemu+ssh://`` (there, the network sets the pace). The images are the built
``twarga/tiny`` and, when built, ``debian/12``.

    .venv/bin/python bench/host_images.py [--rounds 3]

Prints the medians, MB/s and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twarga_lab.virt.host_images import POOL_NAME, HostImageCache, image_files  # noqa: E402
from twarga_lab.virt.images import ImageStore  # noqa: E402
from twarga_lab.virt.libvirt_backend import LibvirtBackend  # noqa: E402


def drop_pool(uri: str) -> None:
    conn = libvirt.open(uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            pool = conn.storagePoolLookupByName(POOL_NAME)
            with contextlib.suppress(libvirt.libvirtError):
                for volume in pool.listAllVolumes():
                    volume.delete(0)
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--images-dir", default=str(REPO / "vms" / "images"))
    args = parser.parse_args()
    store = ImageStore(Path(args.images_dir))
    names = [n for n in ("twarga/tiny", "debian/12") if store.exists(n)]
    if not names:
        sys.exit("no image built: run `make image`")
    backend = LibvirtBackend(args.uri)  # (also silences libvirt's own error printing)
    drop_pool(args.uri)  # a pool of an earlier run points at a folder gone since
    for name in names:
        image = store.get(name)
        size = sum(p.stat().st_size for p in image_files(image).values())
        ours, plain, again = [], [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="twarga-bench-") as work:
                Path(work).chmod(0o755)
                cache = HostImageCache("bench", backend.call, f"{work}/pool")
                started = time.perf_counter()
                cache.ensure(image, lambda _copy: None)
                ours.append(time.perf_counter() - started)
                started = time.perf_counter()
                cache.ensure(image, lambda _copy: None)
                again.append(time.perf_counter() - started)
                target = Path(work) / "plain"
                target.mkdir()
                started = time.perf_counter()
                for path in image_files(image).values():
                    shutil.copyfile(path, target / path.name)
                plain.append(time.perf_counter() - started)
                drop_pool(args.uri)
        mb = size / 2**20
        t_ours, t_plain, t_again = (statistics.median(x) for x in (ours, plain, again))
        print(f"{name}: {mb:.1f} MB in {len(image_files(image))} files, {args.rounds} rounds")
        print(f"  copy through libvirt (pool + stream upload): {t_ours:7.3f} s  "
              f"{mb / t_ours:7.1f} MB/s")  # fmt: skip
        print(f"  shutil.copyfile on this machine            : {t_plain:7.3f} s  "
              f"{mb / t_plain:7.1f} MB/s")  # fmt: skip
        print(f"  second use (marker lookup, no copy)        : {t_again * 1000:7.1f} ms")
        print(f"  ratio (libvirt / plain copy): {t_ours / t_plain:.2f}   "
              f"ratio (second use / first): {t_again / t_ours:.4f}")  # fmt: skip
    backend.close()


if __name__ == "__main__":
    main()
