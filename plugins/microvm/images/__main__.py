"""Build the microVM runtime's boot images, or move the kernel pin.

    python -m plugins.microvm.images [--template NAME]   build (the first half of
                                                          `sandgate images build microvm`)
    python -m plugins.microvm.images --rebuild [...]     build again from today's packages
    python -m plugins.microvm.images --repin             move the kernel pin in templates.toml
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from plugins.common import TerminalProgress
from plugins.microvm.images.build import build_images
from plugins.microvm.images.kernel import repin
from plugins.microvm.images.templates import load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.microvm.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", help="build this template only (default: all)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build again from today's packages even when the cache has the image")
    parser.add_argument("--repin", action="store_true", help="move the kernel pin to Debian's current package")
    args = parser.parse_args(argv)
    progress = TerminalProgress()
    try:
        if args.repin:
            old = load_config().kernel
            pin = repin(progress=progress)
            progress(0.0, "done")
            if pin == old:
                print(f"kernel pin unchanged: {pin.package} {pin.version}")
            else:
                print(f"kernel pin moved: {old.package} {old.version} -> {pin.package} {pin.version} "
                      f"(sha256 {pin.sha256}); rebuild and run the microvm tests before committing")
            return 0
        start = time.monotonic()
        built = build_images(args.template, progress, rebuild=args.rebuild)
        progress(time.monotonic() - start, "done")
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"\n{parser.prog}: {exc}", file=sys.stderr)
        return 1
    for image in built:
        size = image.initrd.stat().st_size / (1 << 20)
        print(f"{image.template}: key {image.key[:16]}, {image.dir} (initrd {size:.1f} MB"
              + (f", rootfs {image.rootfs.stat().st_size / (1 << 20):.0f} MB)" if image.rootfs else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
