#!/usr/bin/env python3
"""Write a one-layer container image as a docker-archive tar (the `docker save` / `podman save` format), which
`ctr images import` and `podman load` both read. No container engine, no registry: the real node's pause image and
Debian base image are made this way.

  mkimage.py -t localhost/lft-pause:3.10 --file /pause=build/pause --entrypoint /pause --user 65535:65535 -o pause.tar
  mkimage.py -t localhost/debian-python:bookworm --layer rootfs.tar --cmd python3 -o base.tar
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def file_layer(files, out):
    """A layer tar holding each DEST=SRC file (owned by root, mode kept, mtime 0 so the digest is reproducible)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for spec in files:
            dest, src = spec.split("=", 1)
            info = tar.gettarinfo(src, arcname=dest.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src, "rb") as f:
                tar.addfile(info, f)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--tag", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layer", help="an existing layer tar (e.g. a rootfs from mmdebstrap)")
    p.add_argument("--file", action="append", default=[], help="DEST=SRC file to put in a new layer")
    p.add_argument("--entrypoint", nargs="*")
    p.add_argument("--cmd", nargs="*")
    p.add_argument("--user")
    a = p.parse_args()
    if bool(a.layer) == bool(a.file):
        p.error("give either --layer or --file")

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.output))) as tmp:
        layer = a.layer
        if not layer:
            layer = os.path.join(tmp, "layer.tar")
            with open(layer, "wb") as f:
                file_layer(a.file, f)
        diff_id = sha256_file(layer)
        cfg = {"Env": [PATH_ENV]}
        if a.entrypoint:
            cfg["Entrypoint"] = a.entrypoint
        if a.cmd:
            cfg["Cmd"] = a.cmd
        if a.user:
            cfg["User"] = a.user
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/cluster/node/mkimage.py"}],
        }, sort_keys=True).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": [a.tag],
                                "Layers": [diff_id + "/layer.tar"]}]).encode()
        partial = a.output + ".partial"
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as out:
            for name, data in ((config_name, config), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                out.addfile(info, io.BytesIO(data))
            out.add(layer, arcname=diff_id + "/layer.tar", recursive=False)
        shutil.move(partial, a.output)


if __name__ == "__main__":
    main()
