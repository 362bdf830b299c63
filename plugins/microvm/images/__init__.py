"""Boot images of the microVM runtime, built from Debian packages and cached.

An image is a Debian cloud kernel (the uncompressed vmlinux, which QEMU's microvm boots through
its PVH entry), an initramfs (a newc cpio: busybox, the virtio modules, guest/init, the guest
agent, and for templates without a disk Debian's python3) and, for templates that declare one, a
read-only ext4 root disk made with debootstrap. Templates are data: ../templates.toml.

Packages that go into an image are downloaded with apt-get and unpacked with dpkg-deb, never
installed on the host; apt runs on the builder's own state for templates.toml's [debian]
sources, so the image is the same whichever distribution the host runs. The kernel .deb must
match its pinned sha256; every other package's version and sha256 go into the image's manifest.

Under `cache_root()/microvm` (0700):

    apt/                      apt's state for the [debian] sources
    debs/                     downloaded .debs (a pinned kernel stays buildable after Debian
                              drops it)
    kernel/<version>-<sha>/   vmlinux and modules of one kernel pin
    rootfs/<recipe>/          a root disk (Debian's files only) and its package list
    images/<template>/<recipe>/  one image: vmlinux, initrd.img, rootfs.ext4, manifest.json,
                              and the runtime's snapshot folders
    build.lock                held by whoever builds

An image's folder is named by its *recipe*: a hash of what is known without apt (the template's
tables, the kernel pin, the init script, the agent's sources, BUILDER_VERSION), so `find_image`
costs a few file reads. Its *key* adds what the build took from Debian (package versions and
hashes): the runtime keys its snapshots on it.

The modules, in the order a build uses them:

    templates    templates.toml parsed and checked
    cache        where images live, their recipe, `find_image` (the runtime's start path)
    guest_files  sandgate's own files in every image: guest/init and the agent
    host         host packages (QEMU, debootstrap) and the QEMU binary
    commands     running the build's commands with progress
    apt          Debian packages on the builder's own apt state
    kernel       the pinned kernel: vmlinux, modules, moving the pin
    elf          ELF readers (libraries, notes, sections)
    tree         an image's root tree on the build host
    initramfs    the initramfs tree of a template
    cpio         the initramfs archive format
    rootfs       the read-only root disk (debootstrap)
    build        putting an image together under build.lock
    __main__     `python -m plugins.microvm.images` (build, rebuild, repin)
"""
