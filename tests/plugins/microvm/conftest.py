"""The microVM tests' shared image: built (or found in the cache) once per test session.

A host that cannot build it (no apt, a package missing and not root, no way to reach Debian's
archive) skips the tests with the reason printed; any other failure of the build is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from plugins.common import TerminalProgress

if TYPE_CHECKING:
    from plugins.microvm.images import BootImage


@pytest.fixture(scope="session")
def microvm_boot_image() -> BootImage:
    """The `default` template's boot image (kernel, initramfs), without any snapshot."""
    from plugins.microvm import images

    try:
        (image,) = images.build_images("default", TerminalProgress())
    except images.HostError as exc:
        pytest.skip(f"the microVM image cannot be built here: {exc}")
    return image


@pytest.fixture(scope="session")
def microvm_image(microvm_boot_image: BootImage) -> BootImage:
    """The `default` template's boot image and its snapshot, as `sandgate images build microvm
    --template default` leaves them (minutes, the first time)."""
    from plugins.microvm import images
    from plugins.microvm.runtime import MicrovmRuntime

    try:
        MicrovmRuntime.build_images({}, "default", TerminalProgress())
    except images.HostError as exc:
        pytest.skip(f"the microVM image cannot be built here: {exc}")
    image = images.find_image("default")
    assert image is not None, "built the default image, but find_image does not see it"
    return image


@pytest.fixture(scope="session")
def microvm_full_image(microvm_image: BootImage) -> BootImage:
    """The `full` template (a Debian root disk with python3, node, bash, gcc; debootstrap takes
    minutes the first time) and its snapshot."""
    from plugins.microvm import images
    from plugins.microvm.runtime import MicrovmRuntime

    try:
        MicrovmRuntime.build_images({}, "full", TerminalProgress())
    except images.HostError as exc:
        pytest.skip(f"the microVM full template cannot be built here: {exc}")
    image = images.find_image("full")
    assert image is not None, "built the full image, but find_image does not see it"
    return image
