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

    async def test_every_file_and_a_last_rename_survive_the_kill(self, gateway: Gateway) -> None:
        """Many small files and a rename right before destroy: the guest's `sync` commits them to
        the ext4 journal, but QEMU is killed before they are checkpointed to their final blocks,
        and read-only mounts (`noload`, in a VM and on the host) replay no journal. Every file must
        still be there, under its last name, for a read-only VM and for the volume files API, and
        the volume's used_bytes must count them."""
        await self._volume(gateway, "many")
        writer = await gateway.create(volumes={"/data": {"name": "many"}})
        done = await gateway.exec(writer["id"], command=["sh", "-c", """
for d in $(seq 1 20); do
    mkdir /data/d$d
    for f in $(seq 1 100); do echo "$d/$f" > /data/d$d/f$f; done
done
mv /data/d20/f100 /data/last-renamed && mv /data/d1 /data/first-dir-renamed"""])
        assert done["exit_code"] == 0, done
        await self._destroy(gateway, writer["id"])

        # The superblock's free counts are the kernel's to write at unmount, which a killed guest
        # never does: used_bytes must come from the counts as they are (each file takes a block,
        # at least 1 KiB).
        described = await (await gateway.client.get("/v1/volumes/many", headers=AUTH)).json()
        assert described["used_bytes"] >= 2000 << 10, described
        resp = await gateway.client.get("/v1/volumes/many/files/last-renamed", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"20/100\n"
        resp = await gateway.client.get("/v1/volumes/many/files/first-dir-renamed/f7", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"1/7\n"
        reader = await gateway.create(volumes={"/in": {"name": "many", "readonly": True}})
        got = await gateway.exec(reader["id"], command=["sh", "-c", "cd /in && find . -type f | wc -l && "
                                                        "ls -d d1 d20/f100 2>&1; cat last-renamed "
                                                        "first-dir-renamed/f100 d19/f100"])
        assert got["stdout"].split("\n")[0] == "2000", got
        assert "No such file" in got["stdout"] and "20/100\n1/100\n19/100\n" in got["stdout"], got
        await self._destroy(gateway, reader["id"])
