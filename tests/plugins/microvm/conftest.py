"""The microVM tests' shared image: built (or found in the cache) once per test session.

A host that cannot build it (no apt, a package missing and not root, no way to reach Debian's
archive) skips the tests with the reason printed; any other failure of the build is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from plugins.common import TerminalProgress

if TYPE_CHECKING:
    from plugins.microvm.images.cache import BootImage


@pytest.fixture(scope="session")
def microvm_boot_image() -> BootImage:
    """The `default` template's boot image (kernel, initramfs), without any snapshot."""
    from plugins.microvm.images.build import build_images
    from plugins.microvm.images.host import HostError

    try:
        (image,) = build_images("default", TerminalProgress())
    except HostError as exc:
        pytest.skip(f"the microVM image cannot be built here: {exc}")
    return image


def _built_with_snapshot(template: str) -> BootImage:
    """`sandgate images build microvm --template <template>`: image and snapshot, or a skip."""
    from plugins.microvm.images.cache import find_image
    from plugins.microvm.images.host import HostError
    from plugins.microvm.runtime import MicrovmRuntime

    try:
        MicrovmRuntime.build_images({}, template, TerminalProgress())
    except HostError as exc:
        pytest.skip(f"the microVM {template} template cannot be built here: {exc}")
    image = find_image(template)
    assert image is not None, f"built the {template} image, but find_image does not see it"
    return image


@pytest.fixture(scope="session")
def microvm_image(microvm_boot_image: BootImage) -> BootImage:
    """The `default` template's boot image and its snapshot, as `sandgate images build microvm
    --template default` leaves them (minutes, the first time)."""
    return _built_with_snapshot("default")


@pytest.fixture(scope="session")
def microvm_full_image(microvm_image: BootImage) -> BootImage:
    """The `full` template (a Debian root disk with python3, node, bash, gcc; debootstrap takes
    minutes the first time) and its snapshot."""
    return _built_with_snapshot("full")


@pytest.fixture(scope="session")
def microvm_polyglot_image(microvm_image: BootImage) -> BootImage:
    """The `polyglot` template (the full template's kind of root disk with a toolchain per language:
    ~1.4 GB of Debian packages, so debootstrap takes many minutes the first time) and its snapshot."""
    return _built_with_snapshot("polyglot")


@pytest.fixture(scope="session")
def microvm_datascience_image(microvm_image: BootImage) -> BootImage:
    """The `datascience` template (the full template's kind of root disk with Debian's numpy,
    pandas and matplotlib, ~1.2 GB with what they pull in: debootstrap takes minutes the first
    time) and its snapshot."""
    return _built_with_snapshot("datascience")
