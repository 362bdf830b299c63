"""Named volumes, patches and whole-file-system access on microVMs: the storage conformance suite
(gateway/testing/storage.py) plus what only a microVM has: real QEMU, real ext4 images on
virtio-blk, through the real gateway (issue 17).

A sandbox with volumes boots cold (no snapshot has its disks), a few seconds each under TCG, so
each test makes only the VMs it needs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gateway.storage import local
from gateway.testing.conformance import AUTH, Gateway
from gateway.testing.storage import StorageConformance

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]


@pytest.fixture(autouse=True)
def _local_store() -> None:
    why = local.available()
    if why is not None:
        pytest.skip(why)


class TestMicrovmStorage(StorageConformance):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}
    whole_file_system = True
    # The default template is an initramfs without /etc/os-release; its init's own config is the
    # same kind of file: the image's, under /etc.
    system_file = "/etc/sandgate/image.conf"
    system_file_holds = b"SANDGATE_TEMPLATE=default"

    async def test_a_closed_file_is_in_the_image_after_destroy(self, gateway: Gateway) -> None:
        """A file written and closed (no sync) by a shell in one microVM is in the image once that
        VM is destroyed: the guest's page cache is flushed before QEMU is killed. A reader's shell
        gets EROFS, and the files API refuses to write there too."""
        await self._volume(gateway, "shared")
        writer = await gateway.create(volumes={"/data": {"name": "shared"}})
        done = await gateway.exec(writer["id"], command=["sh", "-c", "printf hello > /data/greeting && "
                                                         "mkdir /data/sub && seq 1 50000 > /data/sub/n"])
        assert done["exit_code"] == 0, done
        await self._destroy(gateway, writer["id"])

        reader = await gateway.create(volumes={"/mnt/in": {"name": "shared", "readonly": True}})
        got = await gateway.exec(reader["id"], command=["sh", "-c", "cat /mnt/in/greeting; wc -l < /mnt/in/sub/n"])
        assert got["stdout"] == "hello50000\n", got
        refused = await gateway.exec(reader["id"], command=["sh", "-c", "dd if=/dev/zero of=/mnt/in/new count=1"])
        assert refused["exit_code"] != 0 and "Read-only file system" in refused["stderr"], refused
        resp = await gateway.client.put(f"/v1/sandboxes/{reader['id']}/files", params={"path": "/mnt/in/new"},
                                        data=b"x", headers=AUTH)
        assert resp.status >= 400, await resp.text()
        await self._destroy(gateway, reader["id"])

    async def test_a_mount_path_with_a_space_and_a_percent_sign(self, gateway: Gateway) -> None:
        """The guest's init reads mount paths from the kernel command line: a space and a `%`
        there must reach the mount table as asked, not split or decoded."""
        await self._volume(gateway, "odd")
        sandbox = await gateway.create(volumes={"/srv/my data%20": {"name": "odd"}})
        sid = sandbox["id"]
        first = await gateway.exec(sid, command=["sh", "-c", "echo in > '/srv/my data%20/f' && "
                                                 "grep -c ' /srv/my\\\\040data%20 ext4 rw' /proc/mounts"])
        assert first["stdout"] == "1\n", first
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files", params={"path": "/srv/my data%20/f"},
                                        headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"in\n"
        await self._destroy(gateway, sid)
