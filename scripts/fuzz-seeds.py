#!/usr/bin/env python3
"""Seed corpora for every fuzz target (fuzz/corpus/TARGET), from real inputs.

    scripts/fuzz-seeds.py [CKSTREAM_BIN]

Packs small sample trees with the real `ckstream pack` (every codec, one and three shards)
and adds them as they are (reader, scanner) and in the structured form of the `archive`
and `unpack` targets (fuzz/src/lib.rs: flags, u16 index length, the uncompressed index,
shard bodies); the index alone for `index`; podman exports built like podman's (tar and
tar.zst, with the repository's config.dump fixtures) for `podman_import`; the podman
BoltDB fixture for `boltdb`; framed image-streamer messages for `streamer_proto`; a
stats-dump image for `criu_stats`. Existing corpus files are kept (a corpus grows).
"""

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/ckstream")
CORPUS = os.path.join(ROOT, "fuzz/corpus")
FIXTURES = os.path.join(ROOT, "crates/ckstream-podman/tests/fixtures")
HEADER_LEN, FOOTER_LEN, RECORD_HEADER_LEN = 4096, 128, 96


def add(target, data, name=None):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = name or hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def unzstd(data):
    return subprocess.run(["zstd", "-d", "-c", "-q"], input=data, check=True,
                          stdout=subprocess.PIPE).stdout


def zstd(data):
    return subprocess.run(["zstd", "-3", "-c", "-q"], input=data, check=True,
                          stdout=subprocess.PIPE).stdout


def shard_paths(path):
    """Shard 0 and the NAME.ID.i shards beside it, in order."""
    with open(path, "rb") as f:
        head = f.read(64)
    count = struct.unpack_from("<I", head, 52)[0]
    archive_id = head[32:40].hex()
    return [path] + [f"{path}.{archive_id}.{i}" for i in range(1, count)]


def structured(shards, flags):
    """The input of the `archive`/`unpack` targets that reassembles into `shards`."""
    s0 = shards[0]
    footer = s0[-FOOTER_LEN:]
    offset, stored_len, raw_len = struct.unpack_from("<QQQ", footer, 40)
    index = unzstd(s0[offset:offset + stored_len])
    assert len(index) == raw_len and len(index) < 1 << 16, "index too large for a seed"
    bodies = [s0[HEADER_LEN:offset - RECORD_HEADER_LEN]]
    bodies += [s[HEADER_LEN:-FOOTER_LEN] for s in shards[1:]]
    flags |= (len(shards) - 1) << 1
    out = bytes([flags]) + struct.pack("<H", len(index)) + index
    for body in bodies[:-1]:
        assert len(body) < 1 << 16, "shard body too large for a seed"
        out += struct.pack("<H", len(body)) + body
    return out + bodies[-1], index


def sample_tree(top):
    os.makedirs(f"{top}/d/e")
    with open(f"{top}/d/small", "w") as f:
        f.write("hello\n")
    with open(f"{top}/d/e/text", "w") as f:
        f.write("".join(f"{i}\n" for i in range(1500)))
    with open(f"{top}/random", "wb") as f:
        f.write(os.urandom(9000))
    with open(f"{top}/sparse", "wb") as f:
        f.truncate(100000)
        f.seek(70000)
        f.write(b"data in the middle")
    os.symlink("d/small", f"{top}/link")
    os.symlink("/etc/hostname", f"{top}/abs-link")
    os.link(f"{top}/d/small", f"{top}/hard")
    os.mkfifo(f"{top}/fifo")
    if os.geteuid() == 0:
        os.mknod(f"{top}/whiteout", 0o020000 | 0o600, os.makedev(0, 0))
    os.chmod(f"{top}/d/e", 0o555)
    try:
        os.setxattr(f"{top}/d", "user.note", b"x")
    except OSError:
        pass


def archives(work):
    tree = f"{work}/tree"
    sample_tree(tree)
    with open(f"{work}/one", "w") as f:
        f.write("one small file\n")
    made = []
    for codec in ["none", "lz4", "zstd"]:
        for shards in [1, 3]:
            out = f"{work}/tree-{codec}-{shards}.cka"
            subprocess.run([BIN, "pack", "-q", "-c", codec, "--chunk-kib", "64",
                            "--shards", str(shards), "-o", out, tree], check=True)
            made.append(out)
    out = f"{work}/one.cka"
    subprocess.run([BIN, "pack", "-q", "-o", out, f"{work}/one"], check=True)
    made.append(out)
    return made


def fuzz_key(work):
    """The key file of fuzz/src/lib.rs's FUZZ_SECRET_KEY (0600, as ckstream wants)."""
    with open(os.path.join(ROOT, "fuzz/src/lib.rs")) as f:
        src = f.read()
    text = src.split('FUZZ_SECRET_KEY: &str = "', 1)[1].split('";', 1)[0]
    path = f"{work}/fuzz-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text.replace("\\n", "\n"))
    return path


def sealed_seeds(work):
    key = fuzz_key(work)
    tree = f"{work}/tree"
    for codec in ["none", "zstd"]:
        out = f"{work}/sealed-{codec}.cka"
        subprocess.run([BIN, "pack", "-q", "-c", codec, "--chunk-kib", "64", "--sign", key,
                        "--encrypt-to", key, "-o", out, tree], check=True)
        with open(out, "rb") as f:
            data = f.read()
        add("sealed", data)
        add("reader", data)
        add("scanner", data)


def archive_seeds(work):
    for path in archives(work):
        shards = []
        for p in shard_paths(path):
            with open(p, "rb") as f:
                shards.append(f.read())
        for s in shards:
            add("scanner", s)
        if len(shards) == 1:
            add("reader", shards[0])
        for flags in [0, 1, 0x08 | 1, 0x10 | 1, 0x20 | 1, 0x40 | 1]:
            data, index = structured(shards, flags)
            add("unpack", data)
            if flags in (0, 1, 0x08 | 1):
                add("archive", data)
        add("index", bytes([len(shards) - 1]) + index)


def tar_bytes(members):
    """A tar of (name, bytes or None for a directory, extra TarInfo settings), without
    the padding to 10 KiB records after its end marker (small seeds fuzz faster)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, extra in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            info.mode = 0o644
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            for k, v in extra.items():
                setattr(info, k, v)
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    data = buf.getvalue().rstrip(b"\0")
    blocks = (len(data) + 511) // 512
    return data.ljust((blocks + 2) * 512, b"\0")


def podman_seeds():
    rootfs = tar_bytes([
        ("etc", None, {}),
        ("etc/app.conf", b"key=value\n", {"pax_headers": {"SCHILY.xattr.user.k": "v"}}),
        ("etc/link", b"", {"type": tarfile.SYMTYPE, "linkname": "app.conf"}),
        ("etc/hard", b"", {"type": tarfile.LNKTYPE, "linkname": "etc/app.conf"}),
        ("var", None, {}),
        ("var/fifo", b"", {"type": tarfile.FIFOTYPE}),
        ("var/data", bytes(range(256)) * 8, {"pax_headers": {"mtime": "1700000000.5"}}),
    ])
    configs = [json.dumps({"name": "fuzz", "networkMode": "bridge"}).encode()]
    for fixture in ["fixture-bridge.config.dump", "fixture-none.config.dump"]:
        with open(os.path.join(FIXTURES, fixture), "rb") as f:
            configs.append(f.read())
    for config in configs:
        export = tar_bytes([
            ("config.dump", config, {"mode": 0o600}),
            ("spec.dump", json.dumps({"ociVersion": "1.0.2"}).encode(), {"mode": 0o600}),
            ("checkpoint", None, {}),
            ("checkpoint/inventory.img", b"\x54\x64\x59\x58" + bytes(40), {}),
            ("checkpoint/pages-1.img", bytes(range(64)), {}),
            ("rootfs-diff.tar", rootfs, {}),
            ("deleted.files", json.dumps(["/etc/old", "/var"]).encode(), {}),
        ])
        add("podman_import", export)
        add("podman_import", zstd(export))


def main():
    if not os.access(BIN, os.X_OK):
        sys.exit(f"fuzz-seeds: {BIN} is not built")
    work = tempfile.mkdtemp(prefix="ckstream-fuzz-seeds.")
    try:
        archive_seeds(work)
        sealed_seeds(work)
        podman_seeds()
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", work])
        shutil.rmtree(work)
    with open(os.path.join(FIXTURES, "podman-4.3.1-state.db"), "rb") as f:
        add("boltdb", f.read(), "podman-4.3.1-state.db")
    # criu-image-streamer framing: u32 length, then the protobuf message.
    def frame(msg):
        return struct.pack("<I", len(msg)) + msg
    def name(s):
        b = s.encode()
        return frame(b"\x0a" + bytes([len(b)]) + b)
    add("streamer_proto", name("pages-1.img") + name("inventory.img") + frame(b"\x08\x01"))
    add("streamer_proto", frame(b"\x08\x00") + name("pagemap-1.img"))
    # stats-dump: IMG_SERVICE_MAGIC, STATS_MAGIC, u32 length, stats_entry{dump{1..7}}.
    def varint(n):
        out = b""
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                out += bytes([b | 0x80])
            else:
                return out + bytes([b])
    dump = b"".join(bytes([field << 3]) + varint(v)
                    for field, v in enumerate([1200, 35000, 800, 9000, 65536, 0, 30000], 1))
    entry = b"\x0a" + varint(len(dump)) + dump
    add("criu_stats", struct.pack("<III", 0x55105940, 0x57093306, len(entry)) + entry)
    # criu_images: a one-process checkpoint, images split at |||, in the target's order
    # (pstree, inventory, core, ids, files, fdinfo, fs, mm, pagemap, pages, mountpoints,
    # stats); the target adds each image's magic, `!` takes a part as is.
    def msg(*fields):
        return b"".join(bytes([f << 3]) + varint(v) for f, v in fields)
    mm = msg(*[(f, 0) for f in range(1, 8)], (8, 0x1000), (9, 0x1008), (10, 0x1008),
             (11, 0x1010), (12, 1))
    vma = msg((1, 0x1000), (2, 0x2000), (3, 0), (4, 0), (5, 3), (6, 0x22), (7, 1 | 1 << 9), (8, 1))
    mm += b"\x72" + varint(len(vma)) + vma
    page = bytearray(4096)
    page[:16] = b"cmd\0-x\0\0\0HOME=/\0\0\0"
    parts = [
        frame(msg((1, 1), (2, 0), (3, 1), (4, 1))),
        frame(msg((1, 2))),
        frame(msg((1, 1))),
        frame(msg((1, 1), (2, 1), (3, 1), (4, 1))),
        b"",
        frame(msg((1, 1), (2, 0), (3, 2), (4, 3))),
        frame(msg((1, 1), (2, 1))),
        frame(mm),
        frame(msg((1, 1))) + frame(msg((1, 0x1000), (2, 1), (4, 4))),
        b"!" + bytes(page),
    ]
    add("criu_images", b"|||".join(parts))
    add("criu_images", b"|||".join(parts[:4]))
    for target in sorted(os.listdir(CORPUS)):
        print(f"fuzz-seeds: {target}: {len(os.listdir(os.path.join(CORPUS, target)))} inputs")


if __name__ == "__main__":
    main()
